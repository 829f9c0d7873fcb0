"""The memory estimator against the bytes tensors really hold and autograd really saves."""
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from llama import Llama, LlamaConfig  # noqa: E402

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
