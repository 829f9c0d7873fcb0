"""Merge equivalence over every layer type x variant x bias mode x dtype.

Merged output equals unmerged output within the dtype's tolerance and unmerge restores the
base weight. An NF4 base cannot hold the sum exactly: `merge_and_unload()` returns a dense
layer, checked against the dequantized base plus the update; the in-place merge
re-quantizes and is bounded by the NF4 error. DoRA is refused on 4-bit bases.
"""
import pytest
import torch
from torch import nn

from lora import LoRAConfig, apply_lora
from lora.reference import assert_close
from quant import LinearNF4

IN, OUT, VOCAB = 64, 24, 50  # 64: one NF4 block per row
# dtype -> (atol, rtol) for a weight after merge + unmerge (one rounding of W + delta, one of the difference)
WEIGHT_TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2 ** -7, 2 ** -7)}
NF4_MERGE_BOUND = 0.15  # relative RMSE of re-quantizing W + delta (QLoRA sec. 3: NF4 error ~0.1 of W)


def _model(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(IN, OUT).to(dtype)
    elif kind == "embedding":
        base = nn.Embedding(VOCAB, OUT).to(dtype)
    else:
        base = LinearNF4(IN, OUT, compute_dtype=dtype)
        base.bias.data.normal_()
    return nn.Sequential(base)


def _train_a_little(model: nn.Module) -> None:
    """Give every trainable tensor (adapter factors, magnitudes, trained biases) non-trivial values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.1)


def _inputs(kind: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if kind == "embedding":
        return torch.randint(0, VOCAB, (3, 7), generator=g)
    return torch.randn(3, 7, IN, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("variant", ["plain", "rslora", "dora"])
@pytest.mark.parametrize("kind", ["linear", "embedding", "nf4"])
def test_merge_matrix(kind, variant, bias, dtype):
    model = _model(kind, dtype)
    config = LoRAConfig(r=4, alpha=8, target_modules=["0"], bias=bias, rslora=variant == "rslora",
                        dora=variant == "dora")
    if variant == "dora" and kind == "nf4":
        with pytest.raises(ValueError, match="dora=True needs layers with a dense float weight"):
            apply_lora(model, config)
        assert not hasattr(model, "lora_configs")
        return
    apply_lora(model, config)
    layer = model[0]
    _train_a_little(model)
    x = _inputs(kind, dtype)
    with torch.no_grad():
        unmerged = model(x)
    if kind == "nf4":
        _check_nf4(layer, x, unmerged, dtype)
        return
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    with torch.no_grad():
        merged = model(x)
    assert merged.dtype == unmerged.dtype
    assert_close(merged, unmerged, dtype)
    layer.unmerge()
    atol, rtol = WEIGHT_TOL[dtype]
    scale = float(w0.abs().max())
    torch.testing.assert_close(layer.base_layer.weight.detach().float(), w0.float(), atol=atol * scale, rtol=rtol)
    with torch.no_grad():
        assert_close(model(x), unmerged, dtype)


def _check_nf4(layer, x, unmerged, dtype):
    dequant = layer.base_layer.dequantize(torch.float32)  # (out, in)
    delta = layer.get_delta_weight("default").detach().float()
    dense = layer.merge_and_unload()  # a dense nn.Linear in the compute dtype; the 4-bit base is untouched
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == dtype
    # the dense weight is the dequantized base plus the update, rounded once to the compute dtype
    atol, rtol = WEIGHT_TOL[dtype]
    exact = dequant + delta
    torch.testing.assert_close(dense.weight.float(), exact, atol=atol * float(exact.abs().max()), rtol=rtol)
    with torch.no_grad():
        assert_close(dense(x), unmerged, dtype)
    # in place: dequantize, add, re-quantize; unmerge subtracts and re-quantizes again
    layer.merge()
    assert layer.merge_errors["default"] < NF4_MERGE_BOUND
    with torch.no_grad():
        err = (layer(x).double() - unmerged.double()).norm() / unmerged.double().norm()
    assert err < NF4_MERGE_BOUND
    layer.unmerge()
    back = layer.base_layer.dequantize(torch.float32)
    assert ((back - dequant).norm() / dequant.norm()) < 2 * NF4_MERGE_BOUND  # two re-quantizations
