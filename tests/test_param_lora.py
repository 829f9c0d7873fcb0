"""LoRA on raw parameters (lora/param_wrapper.py, PEFT's `target_parameters`): outputs and
gradients against a float64 dense reference, merge, nesting, and PEFT's ParamWrapper on
the same weights."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.param_wrapper import LoRAParameter


class Experts(nn.Module):
    """E experts stored as one (E, a, b) parameter, applied to (E, n, a) inputs; plus a
    2-D (out, in) projection stored as a raw parameter."""

    def __init__(self, E=3, a=8, b=6, out=5, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, a, b, dtype=dtype))
        self.proj = nn.Parameter(torch.randn(out, b, dtype=dtype))

    def forward(self, x):  # (E, n, a) -> (E, n, out)
        return F.linear(torch.bmm(x, self.w), self.proj)


def reference(module, deltas, x):
    """The same computation in float64 with W + delta written out."""
    w = module.w.double() + deltas.get("w", 0)
    proj = module.proj.double() + deltas.get("proj", 0)
    return F.linear(torch.bmm(x.double(), w), proj)


def random_B(layer, name="default"):
    with torch.no_grad():
        layer.lora_B[name].weight.normal_()


def expected_deltas(layer, name="default"):
    """delta from the factors by the layout's definition, expert by expert, in float64."""
    A, B, s = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double(), layer.scaling[name]
    E, r = layer.num_experts, layer.r[name]
    if E == 1:
        return s * B @ A
    return torch.stack([s * B[:, e::E] @ A[e * r:(e + 1) * r] for e in range(E)])  # (E, a, b)


def test_fresh_adapter_changes_nothing_and_B_random_matches_the_reference():
    torch.manual_seed(0)
    base = Experts()
    x = torch.randn(3, 4, 8)
    y0 = base(x)
    layer = LoRAParameter(base, "w", r=2, alpha=4)
    assert torch.equal(layer(x), y0)
    random_B(layer)
    d = expected_deltas(layer)
    assert d.shape == (3, 8, 6)
    torch.testing.assert_close(layer.get_delta_weight("default").double(), d, rtol=1e-6, atol=1e-6)
    # float32 forward vs float64: a few roundings of sums of ~8 terms; 1e-5 relative is 100 u
    torch.testing.assert_close(layer(x).double(), reference(base, {"w": d}, x), rtol=1e-5, atol=1e-5)


def test_gradients_of_A_and_B_match_the_float64_reference():
    torch.manual_seed(1)
    base = Experts(E=2, a=5, b=7, out=3, dtype=torch.float64)
    layer = LoRAParameter(base, "w", r=3, alpha=6)
    random_B(layer)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    layer(x).square().sum().backward()
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    E, r, s = 2, 3, layer.scaling["default"]
    delta = torch.stack([s * B[:, e::E] @ A[e * r:(e + 1) * r] for e in range(E)])
    reference(base, {"w": delta}, x).square().sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, A.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, B.grad, rtol=1e-10, atol=1e-10)
    assert base.w.grad is None and not base.w.requires_grad  # the base stays frozen


def test_two_parameters_nest_and_merge_unmerge():
    torch.manual_seed(2)
    base = Experts()
    x = torch.randn(3, 4, 8)
    inner = LoRAParameter(base, "w", r=2, alpha=4)
    outer = LoRAParameter(inner, "proj", r=2, alpha=2)
    random_B(inner), random_B(outer)
    assert inner.lora_A["default"].weight.requires_grad and outer.lora_A["default"].weight.requires_grad
    d = {"w": expected_deltas(inner), "proj": expected_deltas(outer)}
    assert d["proj"].shape == base.proj.shape
    y = outer(x)
    torch.testing.assert_close(y.double(), reference(base, d, x), rtol=1e-5, atol=1e-5)
    w0, p0 = base.w.detach().clone(), base.proj.detach().clone()
    outer.merge(), inner.merge()
    assert not torch.equal(base.w, w0)
    torch.testing.assert_close(outer(x), y, rtol=1e-5, atol=1e-5)  # merged: the base alone, same output
    inner.unmerge(), outer.unmerge()
    torch.testing.assert_close(base.w, w0, rtol=0, atol=1e-6)  # one rounding of W + delta - delta
    torch.testing.assert_close(base.proj, p0, rtol=0, atol=1e-6)
    outer.disabled = inner.disabled = True
    assert torch.equal(outer(x), base(x))


def test_2d_parameter_matches_a_linear_layer_with_lora():
    torch.manual_seed(3)
    base = Experts()
    layer = LoRAParameter(base, "proj", r=4, alpha=8, init="gaussian")
    random_B(layer)
    assert layer.num_experts == 1 and (layer.out_features, layer.in_features) == (5, 6)
    x = torch.randn(3, 2, 8)
    h = torch.bmm(x, base.w)
    expect = F.linear(h, base.proj) + layer.scaling["default"] * F.linear(
        F.linear(h, layer.lora_A["default"].weight), layer.lora_B["default"].weight)
    torch.testing.assert_close(layer(x), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(parameter_name="nope"), ValueError, r"parameter_name 'nope' is not a parameter of Experts"),
    (dict(parameter_name=3), TypeError, "parameter_name must be a non-empty str"),
    (dict(parameter_name="w", dropout=0.1), ValueError, "dropout must be 0"),
])
def test_bad_arguments(kwargs, exc, pattern):
    base = Experts()
    with pytest.raises(exc, match=pattern):
        LoRAParameter(base, **kwargs)
    assert base.w.requires_grad  # nothing changed


def test_one_dimensional_and_twice_wrapped_parameters_are_refused():
    m = nn.Module()
    m.v = nn.Parameter(torch.randn(7))
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        LoRAParameter(m, "v")
    layer = LoRAParameter(Experts(), "w")
    with pytest.raises(ValueError, match="already has a LoRA wrapper"):
        LoRAParameter(layer, "w")


def test_same_outputs_as_peft_param_wrapper():
    peft = pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()

        def forward(self, x):
            return self.experts(x)

    ours, theirs = Model(), Model()
    theirs.load_state_dict(ours.state_dict())
    inner = LoRAParameter(ours.experts, "w", r=2, alpha=4)
    ours.experts = LoRAParameter(inner, "proj", r=2, alpha=4)
    random_B(inner), random_B(ours.experts)
    theirs = get_peft_model(theirs, LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                               target_parameters=["experts.w", "experts.proj"]))
    # PEFT nests in the same order: the first target innermost; our state dict keys line up.
    peft_sd = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "lora_" in k}
    ours_sd = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert ours_sd.keys() == peft_sd.keys()
    assert all(ours_sd[k].shape == peft_sd[k].shape for k in ours_sd)
    theirs.load_state_dict({"base_model.model." + k: v for k, v in ours_sd.items()}, strict=False)
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert peft.__version__
