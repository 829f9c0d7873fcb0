"""The memory estimator against the bytes tensors really hold and autograd really saves."""

import pytest
import torch
import torch.nn.functional as F

from examples.llama import Llama, LlamaConfig
from lora import LoRAConfig, apply_lora
from lora.memory import (
    PRESETS,
    ModelSpec,
    estimate,
    main,
    memory_usage,
    nf4_storage_bytes,
    saved_activation_bytes,
    tensor_bytes,
)

# The activation count follows each saved tensor of examples/llama.py, so in fp32 it lands
# within 0.1% of what saved-tensor hooks record; 2% is the bound checked (the issue asks 15%).
ACT_TOL = 0.02
TINY = dict(vocab_size=256, dim=48, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=112, max_seq_len=64)


def _loss_fn(model, idx):
    def loss_fn():
        logits = model(idx)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), idx.flatten())
    return loss_fn


def _train_step(model, idx, optimizer):
    """One step; returns the bytes autograd saved in the forward pass."""
    saved, loss = saved_activation_bytes(model, _loss_fn(model, idx))
    loss.backward()
    optimizer.step()
    return saved


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("tie", [True, False])
def test_estimate_matches_tensors_after_a_step(method, tie):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**TINY, tie_embeddings=tie))
    est = estimate(model, method, r=4, target_modules="all-linear", weight_dtype=torch.float32,
                   adapter_dtype=torch.float32, batch_size=2, seq_len=24)
    if method == "lora":
        apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    idx = torch.randint(0, TINY["vocab_size"], (2, 24))
    saved = _train_step(model, idx, opt)
    real = tensor_bytes(model, opt)
    assert est.weights == real["weights"]
    assert est.gradients == real["gradients"]
    assert est.optimizer_states == real["optimizer_states"]
    assert abs(est.activations - saved) <= ACT_TOL * saved, (est.activations, saved)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.trainable_params == n_train


def test_activation_estimate_tracks_batch_and_targets():
    torch.manual_seed(0)
    for targets in (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"]):
        model = Llama(LlamaConfig(**TINY))
        est = estimate(model, "lora", r=8, target_modules=targets, weight_dtype="fp32",
                       batch_size=3, seq_len=16)
        apply_lora(model, LoRAConfig(r=8, alpha=8, target_modules=targets))
        idx = torch.randint(0, TINY["vocab_size"], (3, 16))
        saved, _ = saved_activation_bytes(model, _loss_fn(model, idx))
        assert abs(est.activations - saved) <= ACT_TOL * saved, (targets, est.activations, saved)


def test_spec_matches_model_parameter_count():
    for tie in (True, False):
        cfg = LlamaConfig(**TINY, tie_embeddings=tie)
        model = Llama(cfg)
        n = sum(p.numel() for p in model.parameters())
        assert ModelSpec.from_config(cfg).num_parameters() == n


def test_presets_match_published_sizes():
    # Parameter counts published with the models.
    assert PRESETS["smollm2-135m"].num_parameters() == 134_515_008
    assert PRESETS["llama-3-8b"].num_parameters() == 8_030_261_248
    assert PRESETS["llama-3-70b"].num_parameters() == 70_553_706_496


def test_config_estimate_agrees_with_model_estimate():
    cfg = LlamaConfig(**TINY, tie_embeddings=False)
    model = Llama(cfg)
    spec = ModelSpec.from_config(cfg)
    for method in ("full", "lora", "qlora"):
        a = estimate(model, method, r=4, weight_dtype="bf16", batch_size=2, seq_len=8)
        b = estimate(spec, method, r=4, weight_dtype="bf16", batch_size=2, seq_len=8)
        buffers = sum(b_.numel() * b_.element_size() for b_ in model.buffers())
        assert a.weights - buffers == b.weights
        assert (a.gradients, a.optimizer_states, a.activations) == (
            b.gradients, b.optimizer_states, b.activations)


def test_qlora_weights_are_about_4_127_bits():
    spec = PRESETS["llama-3-8b"]
    e = estimate(spec, "qlora", r=16)
    linear = spec.num_layers * sum(o * i for o, i in spec.linear_shapes().values())
    bits = 8 * e.details["nf4_base"] / linear
    assert 4.12 < bits < 4.13  # QLoRA sec. 3: 4 + 8/64 + 32/(64*256)
    assert 8 * nf4_storage_bytes(4096 * 4096, 64, double_quant=False) / (4096 * 4096) == pytest.approx(4.5, abs=1e-3)


def test_method_ordering_and_savings():
    e = {m: estimate("llama-3-8b", m, r=16) for m in ("full", "lora", "qlora")}
    assert e["qlora"].total < e["lora"].total < e["full"].total
    assert e["lora"].trainable_params < 0.01 * e["full"].trainable_params
    assert e["full"].optimizer_states == 2 * e["full"].weights + 4 * len(PRESETS["llama-3-8b"].parameter_numels())


def test_grad_checkpointing_saves_activations():
    a = estimate("llama-3-8b", "lora", seq_len=2048)
    b = estimate("llama-3-8b", "lora", seq_len=2048, grad_checkpointing=True)
    assert b.activations < a.activations / 5


@pytest.mark.parametrize("kwargs, word", [
    (dict(method="prefix"), "method"), (dict(optimizer="adam8bit"), "optimizer"),
    (dict(r=0), "r"), (dict(batch_size=-1), "batch_size"), (dict(weight_dtype="int3"), "weight_dtype"),
    (dict(target_modules=["c_attn"]), "target_modules"),
])
def test_bad_arguments_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        estimate("llama-3-8b", **kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="model_or_config"):
        estimate("llama-9")


def test_cli_prints_table(capsys):
    assert main(["--config", "llama-3-8b", "--method", "qlora", "--r", "16"]) == 0
    out = capsys.readouterr().out
    assert "| weights |" in out and "qlora" in out and "Llama-3-8B" in out


def test_memory_usage_reports_process():
    u = memory_usage()
    assert u["peak_rss"] >= u["rss"] > 0 or u["peak_rss"] > 0
    x = torch.ones(8 << 20)  # 32 MiB more
    assert memory_usage()["peak_rss"] >= u["rss"]
    del x


def test_qlora_estimate_matches_tensors_after_a_step():
    from quant import quantize_model

    torch.manual_seed(0)
    model = Llama(LlamaConfig(**TINY))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    est = estimate(model, "qlora", r=4, target_modules=targets, weight_dtype="fp32",
                   batch_size=2, seq_len=24)
    quantize_model(model, target_modules=targets, compute_dtype=torch.float32)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    saved = _train_step(model, torch.randint(0, TINY["vocab_size"], (2, 24)), opt)
    real = tensor_bytes(model, opt)
    assert est.weights == real["weights"]
    assert est.gradients == real["gradients"]
    assert est.optimizer_states == real["optimizer_states"]
    assert abs(est.activations - saved) <= ACT_TOL * saved, (est.activations, saved)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["full", "lora"])
def test_estimate_total_against_cuda_peak(method):
    """On a GPU the estimate's total is compared with torch.cuda.max_memory_allocated.
    The peak also holds short-lived temporaries (the logits' gradient, matmul outputs),
    so the total is checked within 25%."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4,
                      ffn_dim=2816, max_seq_len=1024)
    model = Llama(cfg).cuda()
    est = estimate(model, method, r=16, target_modules="all-linear", weight_dtype="fp32",
                   batch_size=4, seq_len=512)
    if method == "lora":
        apply_lora(model, LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    idx = torch.randint(0, cfg.vocab_size, (4, 512), device="cuda")
    for _ in range(2):  # the optimizer states exist from the first step on
        torch.cuda.reset_peak_memory_stats()
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
    peak = torch.cuda.max_memory_allocated()
    print(f"{method}: estimate {est.total / 2**20:.0f} MiB, CUDA peak {peak / 2**20:.0f} MiB")
    assert abs(est.total - peak) <= 0.25 * peak


# --- gradient checkpointing (examples/llama.py's `grad_checkpointing` switch) ---
CKPT_TOL = 0.05  # the bound; the count lands within 1% in fp32


def _saved_storages(model, fn):
    """{storage pointer: bytes} of what autograd saves while fn() runs (not the model's
    own tensors), and fn's result: `saved_activation_bytes`, keeping the storages."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


def _checkpointed_peak_activations(model, idx):
    """Peak activation bytes of a checkpointed step, measured piece by piece: what the
    checkpointed forward saves (outside the blocks, and the block inputs checkpoint keeps;
    a pre-hook records those too, counted once), plus the most any one block saves when
    it runs again (its recomputation in backward saves exactly what a plain call saves;
    its input is already held)."""
    from examples.llama import rope_angles

    held = {}
    hooks = [b.register_forward_pre_hook(
        lambda mod, args: held.__setitem__(args[0].untyped_storage().data_ptr(),
                                           args[0].untyped_storage().nbytes()))
        for b in model.model.layers]
    model.grad_checkpointing = True
    outside, loss = _saved_storages(model, _loss_fn(model, idx))
    for h in hooks:
        h.remove()
    held.update(outside)
    model.grad_checkpointing = False
    B, T = idx.shape
    cos, sin = rope_angles(torch.arange(T).expand(B, T), model.config.head_dim,
                           model.config.rope_base, torch.float32)  # (B, 1, T, hd/2)
    x, per_block = model.model.embed_tokens(idx), []  # (B, T, dim)
    for i, block in enumerate(model.model.layers):
        xi = x.detach().requires_grad_()
        saved, x = _saved_storages(model, lambda b=block, x=xi, i=i: b(x, cos, sin, None, None, i))
        per_block.append(sum(v for k, v in saved.items()
                             if k not in held and k != xi.untyped_storage().data_ptr()))
    return sum(held.values()) + max(per_block), loss


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_checkpointed_activation_estimate_matches_measurement(method):
    from quant import quantize_model

    torch.manual_seed(0)
    model = Llama(LlamaConfig(**TINY))
    est = estimate(model, method, r=4, target_modules="all-linear", weight_dtype="fp32",
                   adapter_dtype="fp32", batch_size=2, seq_len=24, grad_checkpointing=True)
    if method == "qlora":
        quantize_model(model, target_modules=list(LLAMA), compute_dtype=torch.float32)
    if method != "full":
        apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    idx = torch.randint(0, TINY["vocab_size"], (2, 24))
    peak, loss = _checkpointed_peak_activations(model, idx)
    model.grad_checkpointing = True
    loss.backward()
    opt.step()
    real = tensor_bytes(model, opt)
    assert (est.weights, est.gradients, est.optimizer_states) == (
        real["weights"], real["gradients"], real["optimizer_states"])
    assert abs(est.activations - peak) <= CKPT_TOL * peak, (method, est.activations, peak)
    plain = estimate(model if method == "full" else Llama(LlamaConfig(**TINY)), method, r=4,
                     target_modules="all-linear", weight_dtype="fp32", batch_size=2, seq_len=24)
    assert est.activations < plain.activations  # and the test can fail: they differ


LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_gives_the_same_loss_and_gradients(method):
    """Recomputation runs the same ops on the same inputs, so in fp32 the loss and every
    gradient agree to 1e-6 (observed: bit-identical on this CPU)."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**TINY))
    if method == "lora":
        apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)  # B = 0 would make A's gradient zero
    idx = torch.randint(0, TINY["vocab_size"], (2, 24))
    results = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        loss = _loss_fn(model, idx)()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-6, msg=n)


def test_grad_checkpointing_switch_must_be_bool():
    model = Llama(LlamaConfig(**TINY))
    model.grad_checkpointing = "yes"
    with pytest.raises(TypeError, match="grad_checkpointing"):
        model(torch.zeros(1, 4, dtype=torch.long))


# --- mixed precision: fp32 master weights and AdamW, bf16 compute under autocast ---
@pytest.mark.parametrize("tie", [True, False])
def test_mixed_precision_estimate_matches_an_autocast_step(tie):
    """Peak tensor memory of an autocast step, measured as the other modes measure it:
    the tensors the model and AdamW hold after the step (exact) plus what autograd saved
    (hooks; this includes autocast's cached bf16 weight copies), within 5%."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**TINY, tie_embeddings=tie))
    # 4 x 48 tokens: at 2 x 24 the fp32 count happens to land within 0.2% of the mixed one
    # (the weight copies make up for the halved activations), so the check below could not fail.
    est = estimate(model, "full", weight_dtype="fp32", batch_size=4, seq_len=48, mixed_precision=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, TINY["vocab_size"], (4, 48))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        saved, loss = saved_activation_bytes(model, _loss_fn(model, idx))
    assert loss.dtype == torch.float32  # cross_entropy runs in fp32 under autocast
    loss.backward()
    opt.step()
    real = tensor_bytes(model, opt)
    n = sum(p.numel() for p in model.parameters())
    assert est.weights + est.gradients + est.optimizer_states - 4 * len(list(model.parameters())) \
        == 16 * n + sum(b.numel() * b.element_size() for b in model.buffers())  # 4 + 4 + 8 per parameter
    assert (est.weights, est.gradients, est.optimizer_states) == (
        real["weights"], real["gradients"], real["optimizer_states"])
    assert abs(est.activations - saved) <= CKPT_TOL * saved, (est.activations, saved)
    peak = sum(real.values()) + saved
    assert abs(est.total - peak) <= CKPT_TOL * peak
    # and it is not the pure-fp32 or pure-bf16 count: the test could fail
    for act in ("fp32", "bf16"):
        other = estimate(model, "full", weight_dtype="fp32", act_dtype=act, batch_size=4, seq_len=48)
        assert abs(other.activations - saved) > CKPT_TOL * saved


def test_mixed_precision_weight_copies_are_two_bytes_per_weight():
    spec = PRESETS["llama-3-8b"]
    e = estimate(spec, "full", weight_dtype="fp32", mixed_precision=True, seq_len=2048)
    linear = spec.num_layers * sum(o * i for o, i in spec.linear_shapes().values())
    assert e.details["autocast_weight_copies"] == 2 * (linear + spec.vocab_size * spec.hidden_size)
    assert e.weights + e.gradients + e.optimizer_states == 16 * spec.num_parameters() + 4 * len(spec.parameter_numels())


@pytest.mark.parametrize("kwargs, words, error", [
    (dict(mixed_precision=1), ("mixed_precision",), TypeError),
    (dict(grad_checkpointing="yes"), ("grad_checkpointing",), TypeError),
    (dict(method="lora", weight_dtype="fp32", mixed_precision=True), ("method", "mixed_precision"), ValueError),
    (dict(method="qlora", weight_dtype="fp32", mixed_precision=True), ("method", "mixed_precision"), ValueError),
    (dict(method="full", weight_dtype="bf16", mixed_precision=True), ("weight_dtype", "mixed_precision"), ValueError),
    (dict(method="full", weight_dtype="fp32", act_dtype="bf16", mixed_precision=True), ("act_dtype", "mixed_precision"), ValueError),
    (dict(method="full", weight_dtype="fp32", grad_checkpointing=True, mixed_precision=True),
     ("grad_checkpointing", "mixed_precision"), ValueError),
])
def test_new_mode_arguments_are_checked(kwargs, words, error):
    with pytest.raises(error) as err:
        estimate("llama-3-8b", **kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_cli_mixed_precision(capsys):
    assert main(["--config", "smollm2-135m", "--method", "full", "--mixed-precision"]) == 0
    out = capsys.readouterr().out
    assert "fp32 weights" in out and "mixed precision" in out and "| full |" in out
    with pytest.raises(SystemExit):
        main(["--method", "lora", "--mixed-precision"])
