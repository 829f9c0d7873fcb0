"""Padding-free training (`Llama.hidden(idx, lengths=...)`, `Packing`, `lm_loss`) against the
padded path: the same hidden states, loss and gradients, for full fine-tuning, LoRA and QLoRA.

The reference is the model's plain padded forward, `cross_entropy(model(idx), targets,
ignore_index=-100)`, which computes every position of every row.

Tolerances, from the arithmetic:
- float64 (full fine-tuning, LoRA): the two paths do the same operations on the same numbers,
  except that matrix products over N packed rows and over B * T padded rows may be blocked
  differently, so each dot product (length K <= ffn_dim = 40) can round differently: relative
  error at most K * u = 40 * 1.1e-16 = 4.4e-15 (Higham's gamma_K) per linear. The 2 blocks hold
  7 linears each, plus the output head: 15 * 4.4e-15 = 6.7e-14 of the activations' scale, which
  norms keep near 1. Softmax and the loss have condition numbers of a few units on these tiny
  random models, so 1e-12 (about 15x the sum) bounds every entry of the loss and gradients.
- QLoRA: the 4-bit base computes in float32 (`Linear4bit`'s compute dtype; float64 inputs are
  cast down and back): the same count with u = 6e-8 gives 15 * 40 * 6e-8 = 3.6e-5 of the scale;
  atol = rtol = 1e-4 allows 3x that for the same conditioning.
"""
import pytest
import torch
import torch.nn.functional as F

from examples.llama import Llama, LlamaConfig, Packing
from examples.training import IGNORE, lm_loss
from lora import LoRAConfig, apply_lora
from quant import quantize_model

CFG = dict(vocab_size=61, dim=36, n_layers=2, n_heads=3, n_kv_heads=1, ffn_dim=40, max_seq_len=64)
TOL = {"full": (1e-12, 1e-12), "lora": (1e-12, 1e-12), "qlora": (1e-4, 1e-4)}  # (atol, rtol), see above
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_for(method: str, ckpt: bool = False) -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CFG))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.3)  # N(0, 1) would make tied logits near one-hot
    if method == "qlora":
        quantize_model(model, target_modules=TARGETS, compute_dtype=torch.float32)
    if method != "full":
        apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)  # B = 0 would make every A gradient 0: nothing to compare
    model = model.double()
    model.grad_checkpointing = ckpt
    return model.train()


def batch(lengths: list[int], T: int, prefix: int = 0, prompt: int = 3, seed: int = 1):
    """Right-padded ids (B, T) and targets: the first `prefix` tokens the same in every row,
    the first `prompt` positions of each row unscored (the demo's prompt), pads at IGNORE."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, CFG["vocab_size"], (len(lengths), T), generator=g)  # (B, T)
    idx[:, :prefix] = idx[0, :prefix]
    targets = torch.randint(0, CFG["vocab_size"], (len(lengths), T), generator=g)
    for b, n in enumerate(lengths):
        idx[b, n:] = 0
        targets[b, n:] = IGNORE
        targets[b, :prompt] = IGNORE
    return idx, targets


def loss_and_grads(model: Llama, loss: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def padded_reference(model: Llama, idx, targets):
    logits = model(idx)  # (B, T, V): every position of every row
    return loss_and_grads(model, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE))


CASES = {  # name: (lengths, T, shared prefix)
    "odd lengths, shared prefix": ([13, 6, 9, 11], 13, 4),
    "odd lengths, no shared prefix": ([7, 13, 5], 13, 0),
    "one row, padded": ([9], 12, 0),
    "no padding, shared prefix": ([10, 10, 10], 10, 5),
    "no padding, nothing to leave out": ([10, 10], 10, 0),
}


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("case, ckpt", [(c, False) for c in CASES] + [("odd lengths, shared prefix", True)])
def test_loss_and_every_gradient_match_the_padded_path(method, case, ckpt):
    """With gradient checkpointing on, the padded reference and the packed path both recompute."""
    lengths, T, prefix = CASES[case]
    model = model_for(method, ckpt)
    idx, targets = batch(lengths, T, prefix)
    ref_loss, ref_grads = padded_reference(model, idx, targets)
    loss, grads = loss_and_grads(model, lm_loss(model, idx, targets))
    atol, rtol = TOL[method]
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() == trainable  # every trainable parameter got a gradient
    if method != "full":
        assert len(trainable) == 2 * len(TARGETS) * CFG["n_layers"]  # every LoRA A and B
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=atol, rtol=rtol, msg=n)


def test_unscored_tail_of_a_row_is_left_out_and_changes_nothing():
    """lm_loss cuts each row after its last scored position: real tokens there (not only pads)
    are not computed, and the loss and gradients are still the padded path's."""
    model = model_for("lora")
    idx, targets = batch([13, 6, 9], 13, prefix=4)
    targets[0, 9:] = IGNORE  # row 0's last 4 real tokens are not scored
    seen = []
    hook = model.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    loss, grads = loss_and_grads(model, lm_loss(model, idx, targets))
    hook.remove()
    assert seen[0] == (9 + 2 + 5, CFG["dim"])  # row 0 up to its last scored position, rows 1, 2 after the prefix
    ref_loss, ref_grads = padded_reference(model, idx, targets)
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-12, rtol=1e-12, msg=n)


def test_hidden_states_match_at_real_positions_and_pads_are_zero():
    model = model_for("full")
    idx, _ = batch([13, 6, 9, 11], 13, prefix=4)
    lengths = torch.tensor([13, 6, 9, 11])
    with torch.no_grad():
        ref = model.hidden(idx)  # (B, T, dim)
        out = model.hidden(idx, lengths=lengths)
    valid = torch.arange(13) < lengths[:, None]  # (B, T)
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-12, rtol=1e-12)
    assert out[~valid].eq(0).all() and not ref[~valid].eq(0).all()


def test_packing_layout_known_answer():
    """Rows of lengths 4, 2, 3 sharing their first 2 tokens (T = 4): row 0 computes all 4,
    rows 1 and 2 only their own tokens (none and one), and read row 0's shared prefix."""
    idx = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0], [5, 6, 9, 0]])
    p = Packing.of(idx, torch.tensor([4, 2, 3]))
    assert p.source.tolist() == [0, 1, 2, 3, 10]  # flat b * T + t
    assert p.positions.tolist() == [0, 1, 2, 3, 2]
    assert p.index[0].tolist() == [0, 1, 2, 3] and p.index[1, :2].tolist() == [0, 1]
    assert p.index[2, :3].tolist() == [0, 1, 4]
    assert p.valid.tolist() == [[True] * 4, [True, True, False, False], [True, True, True, False]]
    # Without sharing, every real token is computed once in its own row.
    q = Packing.of(idx, torch.tensor([4, 2, 3]), share_prefix=False)
    assert q.source.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10]
    assert q.index[2, :3].tolist() == [6, 7, 8]


def test_shared_prefix_stops_at_the_shortest_row():
    """A row whose real tokens are all prefix shares them all, but the prefix never runs past
    a row's length (a pad of one row equal to a real token of another is not shared)."""
    idx = torch.tensor([[5, 6, 0, 4], [5, 6, 0, 0]])
    p = Packing.of(idx, torch.tensor([4, 2]))
    assert p.source.tolist() == [0, 1, 2, 3]


def test_unpadded_training_step_and_mixed_adapters_fall_back():
    """lm_loss on a `Llama` takes the packed path (fewer rows reach the layers); under a
    mixed-adapter batch (rows routed to adapters by their batch index) it keeps rows padded."""
    from lora import use_adapters

    model = model_for("lora")
    model.model.layers[0].mlp.up_proj.add_adapter("other", r=2, alpha=4)
    idx, targets = batch([13, 6, 9], 13, prefix=4)
    seen = []
    hook = model.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    lm_loss(model, idx, targets)
    assert seen[-1] == (13 + 2 + 5, CFG["dim"])  # N computed tokens: 13 + (6 - 4) + (9 - 4)
    with torch.no_grad(), use_adapters(model, ["default", "other", "default"]):
        lm_loss(model, idx, targets)
    assert seen[-1][:2] == (3, 13)
    hook.remove()


@pytest.mark.parametrize("lengths, error, words", [
    (torch.tensor([3.0, 2.0]), TypeError, "lengths must be an int64 or int32 tensor of shape \\(2,\\)"),
    (torch.tensor([3]), TypeError, "shape \\(2,\\)"),
    ([3, 2], TypeError, "got list"),
    (torch.tensor([0, 2]), ValueError, "between 1 and T=4"),
    (torch.tensor([5, 2]), ValueError, "between 1 and T=4"),
])
def test_bad_lengths_name_the_argument(lengths, error, words):
    model = Llama(LlamaConfig(**CFG))
    with pytest.raises(error, match=words):
        model.hidden(torch.zeros(2, 4, dtype=torch.long), lengths=lengths)


def test_lengths_need_2d_token_ids():
    with pytest.raises(ValueError, match="idx must be a \\(B, T\\) tensor"):
        Packing.of(torch.zeros(4, dtype=torch.long), torch.tensor([4]))


@pytest.mark.parametrize("extra", ["positions", "mask", "inputs_embeds"])
def test_lengths_takes_plain_token_ids_only(extra):
    model = Llama(LlamaConfig(**CFG))
    idx = torch.zeros(2, 4, dtype=torch.long)
    kw = {"positions": torch.zeros(2, 4, dtype=torch.long), "mask": torch.ones(2, 1, 4, 4, dtype=torch.bool),
          "inputs_embeds": torch.zeros(2, 4, CFG["dim"])}
    args = {"idx": None} if extra == "inputs_embeds" else {"idx": idx}
    with pytest.raises(ValueError, match="lengths .* must be None with it"):
        model.hidden(**args, **{extra: kw[extra]}, lengths=torch.tensor([4, 2]))


def test_training_benchmark_merges_its_rows_into_the_csv():
    """A run of one mode replaces its own rows and keeps every other row of the CSV."""
    from benchmarks.training import _mode_of, _threads_of, merge_rows

    def row(provider, shape, metric, value):
        return {"benchmark": "training", "provider": provider, "shape": shape, "metric": metric, "value": value}
    old = [row("loralab-qlora", "B=4 T=128 r=16", "tokens_per_s", 1), row("loralab-qlora", "demo batches B=8 r=16",
                                                                         "tokens_per_s", 2)]
    new = [row("loralab-qlora", "demo batches B=8 r=16", "tokens_per_s", 3),
           row("loralab-qlora", "demo batches B=8 r=16 threads=1", "tokens_per_s", 4)]
    assert [r["value"] for r in merge_rows(old, new)] == [1, 3, 4]
    assert [(_mode_of(s), _threads_of(s)) for s in ("B=4 T=128 r=16", "B=4 T=128 r=16 threads=1 ckpt",
                                                    "demo batches B=8 r=16 threads=1")] == [
        ("plain", 2), ("ckpt", 1), ("masked", 1)]
