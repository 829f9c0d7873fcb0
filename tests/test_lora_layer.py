"""LoRALinear / LoRAEmbedding against the dense float64 reference: forward, merge, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora import (
    LoRAConfig,
    LoRAEmbedding,
    LoRALinear,
    disable_adapters,
    mark_only_lora_as_trainable,
)
from lora.reference import assert_close, lora_embedding_ref, lora_linear_ref

# (in_features, out_features, r, leading shape of x): round shapes next to odd ones.
SHAPES = [(64, 64, 8, (4, 16)), (9, 41, 3, (7,)), (341, 17, 5, (2, 3, 5))]


def make_layer(fin, fout, r, base_dtype=torch.float32, adapter_dtype=None, seed=0, **kw):
    """A LoRALinear with a random (non-zero) B, so the adapter path matters."""
    torch.manual_seed(seed)
    base = nn.Linear(fin, fout).to(base_dtype)
    layer = LoRALinear.from_linear(base, r=r, alpha=2.0 * r + 1, dtype=adapter_dtype, **kw)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer


def ref_of(layer, x, name="default"):
    return lora_linear_ref(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A[name].weight,
                           layer.lora_B[name].weight, layer.scaling[name], layer.fan_in_fan_out)


@pytest.mark.parametrize("fin,fout,r,lead", SHAPES)
@pytest.mark.parametrize("base_dtype,adapter_dtype", [(torch.float32, torch.float32),
                                                      (torch.bfloat16, torch.float32),
                                                      (torch.bfloat16, torch.bfloat16),
                                                      (torch.float64, None)])
def test_forward_matches_reference(fin, fout, r, lead, base_dtype, adapter_dtype):
    layer = make_layer(fin, fout, r, base_dtype, adapter_dtype)
    x = torch.randn(*lead, fin).to(base_dtype)
    out = layer(x)
    assert out.dtype == x.dtype and out.shape == (*lead, fout)
    assert_close(out, ref_of(layer, x), base_dtype)


def test_fresh_layer_equals_base_exactly():
    torch.manual_seed(0)
    base = nn.Linear(33, 21)
    layer = LoRALinear.from_linear(base, r=4, alpha=8)
    x = torch.randn(5, 33)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_constructor_builds_base_and_keeps_weight_object():
    layer = LoRALinear(12, 7, r=2, alpha=4, bias=False)
    assert isinstance(layer.base_layer, nn.Linear) and layer.base_layer.bias is None
    assert layer.scaling["default"] == 2.0 and layer.r["default"] == 2
    base = nn.Linear(12, 7)
    weight = base.weight
    wrapped = LoRALinear.from_linear(base, r=2)
    assert wrapped.base_layer is base and wrapped.base_layer.weight is weight
    assert not weight.requires_grad


def test_scaling_and_rslora():
    assert LoRALinear(8, 8, r=16, alpha=32).scaling["default"] == 2.0
    assert LoRALinear(8, 8, r=16, alpha=32, rslora=True).scaling["default"] == pytest.approx(32 / math.sqrt(16))


def test_init_schemes():
    torch.manual_seed(0)
    fin, r = 400, 16
    kaiming = LoRALinear(fin, 300, r=r).lora_A["default"].weight
    bound = 1 / math.sqrt(fin)  # kaiming-uniform, a = sqrt(5): sqrt(6 / ((1 + 5) * fan_in))
    assert kaiming.abs().max() <= bound and kaiming.abs().max() > 0.9 * bound
    gauss = LoRALinear(fin, 300, r=r, init="gaussian")
    assert gauss.lora_A["default"].weight.std().item() == pytest.approx(1 / r, rel=0.05)
    assert torch.count_nonzero(gauss.lora_B["default"].weight) == 0


@pytest.mark.parametrize("fin,fout,r,lead", SHAPES)
def test_gradients_only_into_A_and_B(fin, fout, r, lead):
    layer = make_layer(fin, fout, r)
    x = torch.randn(*lead, fin, requires_grad=True)
    grad_out = torch.randn(*lead, fout)
    (layer(x) * grad_out).sum().backward()
    A = layer.lora_A["default"].weight.detach().double().requires_grad_()
    B = layer.lora_B["default"].weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ref = lora_linear_ref(x64, layer.base_layer.weight, layer.base_layer.bias, A, B, layer.scaling["default"])
    (ref * grad_out.double()).sum().backward()
    assert_close(layer.lora_A["default"].weight.grad, A.grad, torch.float32)
    assert_close(layer.lora_B["default"].weight.grad, B.grad, torch.float32)
    assert_close(x.grad, x64.grad, torch.float32)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.default.weight", "lora_B.default.weight"}


@pytest.mark.parametrize("fin,fout,r,lead", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_unmerged_and_is_idempotent(fin, fout, r, lead, dtype):
    layer = make_layer(fin, fout, r, base_dtype=dtype, adapter_dtype=torch.float32)
    x = torch.randn(*lead, fin).to(dtype)
    before = layer(x)
    w0 = layer.base_layer.weight.detach().clone()
    expected_w = (w0.double() + layer.get_delta_weight("default").double())
    layer.merge()
    layer.merge()  # idempotent: merged once
    assert layer.merged and layer.merged_adapters == ["default"]
    assert_close(layer.base_layer.weight, expected_w, dtype)
    merged_out = layer(x)
    assert merged_out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(merged_out, before, atol=1e-5, rtol=1e-5)
    else:  # bf16: both sides round differently; compare each to the float64 reference
        assert_close(merged_out, lora_linear_ref(x, w0, layer.base_layer.bias, layer.lora_A["default"].weight,
                                                 layer.lora_B["default"].weight, layer.scaling["default"]), dtype)
    layer.unmerge()
    with pytest.warns(UserWarning, match="unmerge"):
        layer.unmerge()  # idempotent: nothing merged, so nothing changes (and it warns)
    assert not layer.merged
    # Unmerge subtracts the same delta; in bf16 each step rounds once, to half an ulp of the sum.
    assert_close(layer.base_layer.weight, w0, dtype)


def test_merge_writes_into_the_original_weight_object():
    base = nn.Linear(10, 6)
    weight = base.weight
    layer = LoRALinear.from_linear(base, r=2)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.5)
    w0 = weight.detach().clone()
    layer.merge()
    assert layer.base_layer.weight is weight and not torch.equal(weight, w0)
    layer.unmerge()
    torch.testing.assert_close(weight.detach(), w0, atol=1e-6, rtol=0)


def test_safe_merge_refuses_non_finite():
    layer = make_layer(8, 8, 2)
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_dropout_applies_to_adapter_path_only():
    layer = make_layer(16, 8, 4, dropout=0.5)
    x = torch.randn(6, 16)
    layer.eval()
    assert_close(layer(x), ref_of(layer, x), torch.float32)
    layer.train()
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    x_drop = F.dropout(x, 0.5, training=True)  # the same mask: same seed, same shape
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    expected = layer.base_layer(x).double() + s * (x_drop.double() @ A.double().T @ B.double().T)
    assert_close(out, expected, torch.float32)


def test_conv1d_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(nf=13, nx=7)  # weight (in=7, out=13)
    nn.init.normal_(conv.weight)
    layer = LoRALinear.from_linear(conv, r=3, alpha=5)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (7, 13)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 5, 7)
    assert_close(layer(x), ref_of(layer, x), torch.float32)
    before = layer(x)
    plain = layer.merge_and_unload()
    assert plain is conv
    torch.testing.assert_close(plain(x), before, atol=1e-5, rtol=1e-5)


def test_bias_modes():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[0] = LoRALinear.from_linear(model[0], r=2)
    for mode, expected in [("none", set()), ("lora_only", {"0.base_layer.bias"}),
                           ("all", {"0.base_layer.bias", "1.bias"})]:
        mark_only_lora_as_trainable(model, bias=mode)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == expected | {"0.lora_A.default.weight", "0.lora_B.default.weight"}
    with pytest.raises(ValueError, match="bias"):
        mark_only_lora_as_trainable(model, bias="some")


@pytest.mark.parametrize("kwargs,word", [({"r": 0}, "r"), ({"r": -2}, "r"), ({"r": 2.5}, "r"),
                                         ({"alpha": float("nan")}, "alpha"), ({"alpha": -1}, "alpha"),
                                         ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
                                         ({"init": "xavier"}, "init")])
def test_bad_arguments_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        LoRALinear(4, 4, **kwargs)
    with pytest.raises(ValueError, match=word):
        LoRAConfig(target_modules=["q"], **kwargs)


def test_bad_config_bias_and_wrap_twice():
    with pytest.raises(ValueError, match="bias"):
        LoRAConfig(target_modules=["q"], bias="some")
    layer = LoRALinear(4, 4)
    with pytest.raises(ValueError, match="already"):
        LoRALinear.from_linear(layer)
    with pytest.raises(ValueError, match="already"):
        layer.add_adapter("default")
    with pytest.raises(TypeError, match="base_layer"):
        LoRALinear.from_linear(nn.ReLU())


def test_several_adapters_switch_and_delete():
    layer = make_layer(12, 10, 3)
    layer.add_adapter("other", r=5, alpha=3)
    with torch.no_grad():
        layer.lora_B["other"].weight.normal_()
    x = torch.randn(4, 12)
    assert layer.active_adapters == ["default"]
    assert_close(layer(x), ref_of(layer, x, "default"), torch.float32)
    weight_id = id(layer.base_layer.weight)
    layer.set_adapter("other")
    assert_close(layer(x), ref_of(layer, x, "other"), torch.float32)
    assert id(layer.base_layer.weight) == weight_id  # switching never touches the base
    assert not layer.lora_A["default"].weight.requires_grad and layer.lora_A["other"].weight.requires_grad
    layer.set_adapter(["default", "other"])
    both = ref_of(layer, x, "default") + ref_of(layer, x, "other") - layer.base_layer(x).double()
    assert_close(layer(x), both, torch.float32)
    layer.merge()
    assert_close(layer(x), both, torch.float32)
    layer.unmerge()
    layer.delete_adapter("other")
    assert layer.adapter_names == ["default"] and layer.active_adapters == ["default"]
    with pytest.raises(ValueError, match="not found"):
        layer.set_adapter("other")


def test_disable_adapters_context():
    model = nn.Sequential(make_layer(8, 8, 2), nn.ReLU(), make_layer(8, 3, 2, seed=1))
    x = torch.randn(5, 8)
    adapted = model(x)
    base_only = model[2].base_layer(torch.relu(model[0].base_layer(x)))
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base_only)
    torch.testing.assert_close(model(x), adapted)
    model[0].merge()
    with disable_adapters(model):
        assert not model[0].merged
        torch.testing.assert_close(model(x), base_only, atol=1e-5, rtol=1e-5)
    assert model[0].merged
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num,dim,r,ids_shape", [(32, 16, 4, (3, 7)), (53, 11, 3, (13,))])
def test_embedding_forward_merge_gradients(num, dim, r, ids_shape):
    torch.manual_seed(0)
    emb = nn.Embedding(num, dim, padding_idx=0)
    layer = LoRAEmbedding.from_layer(emb, r=r, alpha=2 * r)
    ids = torch.randint(0, num, ids_shape)
    assert torch.equal(layer(ids), emb(ids))  # A starts at zero
    assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0
    assert torch.count_nonzero(layer.lora_embedding_B["default"]) > 0
    with torch.no_grad():
        layer.lora_embedding_A["default"].normal_()
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    out = layer(ids)
    assert_close(out, lora_embedding_ref(ids, emb.weight, A, B, layer.scaling["default"]), torch.float32)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    (lora_embedding_ref(ids, emb.weight, A64, B64, layer.scaling["default"]) * grad_out.double()).sum().backward()
    A64.grad[:, emb.padding_idx] = 0  # as nn.Embedding: the padding row gets no gradient
    assert torch.count_nonzero(A.grad[:, emb.padding_idx]) == 0
    assert_close(A.grad, A64.grad, torch.float32)
    assert_close(B.grad, B64.grad, torch.float32)
    assert emb.weight.grad is None
    layer.merge()
    torch.testing.assert_close(layer(ids), out.detach(), atol=1e-5, rtol=1e-5)
    plain = layer.merge_and_unload()
    assert plain is emb and isinstance(plain, nn.Embedding)


def test_generic_base_output_is_never_modified_in_place():
    class CachedOutput(nn.Module):  # linear-like, but returns the same tensor every call
        def __init__(self, fin, fout):
            super().__init__()
            self.in_features, self.out_features = fin, fout
            self.register_buffer("cached", torch.randn(5, fout))

        def forward(self, x):
            return self.cached

    torch.manual_seed(0)
    base = CachedOutput(6, 4)
    cached = base.cached.clone()
    layer = LoRALinear.from_layer(base, r=2, alpha=2)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, 6, requires_grad=True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    for _ in range(2):
        out = layer(x)
        assert_close(out, cached.double() + (x.double() @ A.double().T @ B.double().T), torch.float32)
    out.sum().backward()
    assert torch.equal(base.cached, cached) and A.grad is not None and x.grad is not None
