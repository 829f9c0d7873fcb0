"""QLoRALinear: LoRA over a 4-bit base, against a dense float64 reference."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora import LoRAConfig, apply_lora, merge_and_unload
from lora.qlora import QLoRALinear, relative_rmse
from quant import LinearNF4, quantize_model

# (compute dtype, atol, rtol) against the float64 reference on the same 4-bit weight
TOL = [(torch.float32, 2e-5, 1e-5), (torch.bfloat16, 8e-2, 3e-2)]


def make_layer(in_f=48, out_f=24, compute_dtype=torch.float32, seed=0, r=4, alpha=8):
    torch.manual_seed(seed)
    base = LinearNF4.from_linear(nn.Linear(in_f, out_f), compute_dtype=compute_dtype)
    layer = QLoRALinear.from_layer(base, r=r, alpha=alpha)
    with torch.no_grad():  # a trained-looking adapter: B nonzero
        layer.lora_B["default"].weight.normal_(0, 0.1)
    return layer


def reference(layer: QLoRALinear, x):
    """float64: F.linear with the dequantized weight + scaling * x A^T B^T."""
    base = layer.base_layer
    w = base.dequantize(torch.float32).double()
    A = layer.lora_A["default"].weight.double()
    B = layer.lora_B["default"].weight.double()
    x = x.double()
    return F.linear(x, w, base.bias.double()) + layer.scaling["default"] * (x @ A.T @ B.T)


def test_fresh_layer_equals_base():
    torch.manual_seed(0)
    base = LinearNF4.from_linear(nn.Linear(40, 9), compute_dtype=torch.float32)
    layer = QLoRALinear.from_layer(base, r=4)
    x = torch.randn(3, 40)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("compute_dtype,atol,rtol", TOL)
@pytest.mark.parametrize("in_f,out_f", [(64, 32), (41, 9)])
def test_forward_and_grads_match_reference(compute_dtype, atol, rtol, in_f, out_f):
    layer = make_layer(in_f, out_f, compute_dtype)
    assert layer.lora_A["default"].weight.dtype == compute_dtype  # adapters in the compute dtype
    x = torch.randn(2, 3, in_f, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 3, out_f)
    torch.testing.assert_close(y.double(), reference(layer, x.detach()), atol=atol, rtol=rtol)
    g = torch.randn_like(y)
    y.backward(g)

    # the same gradients from autograd on the float64 reference
    A = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    w = layer.base_layer.dequantize(torch.float32).double()
    ref = F.linear(x64, w, layer.base_layer.bias.double()) + layer.scaling["default"] * (x64 @ A.T @ B.T)
    ref.backward(g.double())
    grad_tol = dict(atol=atol * 10, rtol=rtol * 10)
    torch.testing.assert_close(x.grad.double(), x64.grad, **grad_tol)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad.double(), A.grad, **grad_tol)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad.double(), B.grad, **grad_tol)
    assert layer.base_layer.bias.grad is None
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == \
        ["lora_A.default.weight", "lora_B.default.weight"]


def test_apply_lora_on_quantized_model_and_training_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    quantize_model(model, compute_dtype=torch.float32)
    names = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["0", "2"]))
    assert names == ["0", "2"] and all(isinstance(model[i], QLoRALinear) for i in (0, 2))
    x = torch.randn(64, 32)
    target = 2 * x[:, :4]  # reachable through rank-4 adapters
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_merge_requantizes_and_reports_error():
    layer = make_layer(128, 64)
    x = torch.randn(5, 128)
    before = layer(x)
    packed_before = layer.base_layer.weight_packed.clone()
    layer.merge()
    assert layer.merged and 0 < layer.merge_errors["default"] < 0.12
    after = layer(x)  # base only, now holding W + delta re-quantized
    assert not torch.equal(packed_before, layer.base_layer.weight_packed)
    assert relative_rmse(after, before) < 0.15
    layer.unmerge()
    assert not layer.merged
    assert relative_rmse(layer(x), before) < 0.15


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unload_dense(compute_dtype):
    layer = make_layer(48, 24, compute_dtype)
    x = torch.randn(4, 48)
    exact = layer.base_layer.dequantize(torch.float32) + layer.get_delta_weight("default").float()
    dense = layer.merge_and_unload()
    assert type(dense) is nn.Linear and dense.weight.dtype == compute_dtype
    torch.testing.assert_close(dense.weight.float(), exact, atol=0 if compute_dtype == torch.float32 else 1e-2,
                               rtol=0 if compute_dtype == torch.float32 else 8e-3)
    if compute_dtype == torch.float32:
        torch.testing.assert_close(dense(x), layer(x), atol=1e-5, rtol=1e-5)
    assert not layer.merged  # the QLoRA layer itself is untouched


def test_merge_and_unload_requantize():
    layer = make_layer(128, 64)
    exact = layer.base_layer.dequantize(torch.float32) + layer.get_delta_weight("default").float()
    q = layer.merge_and_unload(requantize=True)
    assert isinstance(q, LinearNF4)
    assert q.requantization_error == pytest.approx(relative_rmse(q.dequantize(torch.float32), exact))
    assert 0 < q.requantization_error < 0.12


def test_model_level_merge_and_unload():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    quantize_model(model, compute_dtype=torch.float32)
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
    merge_and_unload(model)
    assert all(type(m) is nn.Linear for m in model)


def test_bad_base():
    with pytest.raises(TypeError, match="LinearNF4"):
        QLoRALinear.from_layer(nn.Linear(4, 4))


def test_direct_construction_builds_a_4bit_base():
    layer = QLoRALinear(64, 16, r=2, alpha=4, blocksize=32, double_quant=False)
    assert isinstance(layer.base_layer, LinearNF4) and layer.base_layer.blocksize == 32
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16  # the default compute dtype
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), layer.base_layer(x))  # B starts at zero
