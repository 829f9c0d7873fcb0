"""combine_adapters: the exact weighted sum of LoRA updates, SVD truncation, files and refusals."""
import pytest
import torch
from torch import nn

from lora import (
    LoRAConfig,
    apply_lora,
    combine_adapters,
    load_adapter,
    lora_layers,
    save_adapter,
    set_adapter,
)
from lora.combine import get_factors


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 9)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def _net(adapters=(("a", 4, 8, False), ("b", 6, 3, True))):
    torch.manual_seed(0)
    net = Net()
    for i, (name, r, alpha, rslora) in enumerate(adapters):
        apply_lora(net, LoRAConfig(r=r, alpha=alpha, rslora=rslora, target_modules=["emb", "fc1", "fc2"]),
                   adapter_name=name)
        g = torch.Generator().manual_seed(10 + i)
        for _, layer in lora_layers(net):
            for p in layer.parameters():
                if p.dim() == 2 and p.shape != layer.base_layer.weight.shape:  # the adapter factors
                    with torch.no_grad():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def _delta(layer, name):
    """`scaling * B A` float64 in (B A) orientation (the transpose of an embedding's weight)."""
    A, B = get_factors(layer, name)
    return layer.scaling[name] * (B @ A)


def test_exact_combination_equals_the_weighted_sum():
    net = _net()
    errors = combine_adapters(net, {"a": 0.7, "b": 0.3}, name="mix")
    assert errors == {"emb": 0.0, "fc1": 0.0, "fc2": 0.0}
    for _path, layer in lora_layers(net):
        assert layer.r["mix"] == 10 and layer.scaling["mix"] == 1.0
        expected = 0.7 * _delta(layer, "a") + 0.3 * _delta(layer, "b")
        torch.testing.assert_close(_delta(layer, "mix"), expected, atol=1e-6, rtol=1e-6)
    ids = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(1))
    set_adapter(net, "mix")
    out = net(ids)
    # reference model: dense weights with the weighted updates added
    torch.manual_seed(0)
    ref = Net().double()
    with torch.no_grad():
        for name in ("emb", "fc1", "fc2"):
            layer = net.get_submodule(name)
            delta = 0.7 * _delta(layer, "a") + 0.3 * _delta(layer, "b")
            getattr(ref, name).weight.add_(delta.T if name == "emb" else delta)
    torch.testing.assert_close(out.double(), ref(ids), atol=1e-5, rtol=1e-5)


def test_cross_terms_of_factor_averaging_are_avoided():
    net = _net(adapters=(("a", 4, 4, False), ("b", 4, 4, False)))
    combine_adapters(net, {"a": 0.5, "b": 0.5}, name="mix")
    layer = net.fc1
    (Aa, Ba), (Ab, Bb) = get_factors(layer, "a"), get_factors(layer, "b")
    averaged = (0.5 * Ba + 0.5 * Bb) @ (0.5 * Aa + 0.5 * Ab)  # contains B_a A_b and B_b A_a
    exact = 0.5 * Ba @ Aa + 0.5 * Bb @ Ab
    torch.testing.assert_close(_delta(layer, "mix"), exact, atol=1e-6, rtol=1e-6)
    assert (averaged - exact).norm() > 0.1 * exact.norm()


@pytest.mark.parametrize("r", [1, 3, 9, 12])
def test_truncation_is_the_best_rank_r_approximation(r):
    net = _net()
    errors = combine_adapters(net, {"a": 1.0, "b": -0.5}, name="mix", r=r)
    for path, layer in lora_layers(net):
        full = _delta(layer, "a") - 0.5 * _delta(layer, "b")
        U, S, Vh = torch.linalg.svd(full, full_matrices=False)
        best = (U[:, :r] * S[:r]) @ Vh[:r]  # Eckart-Young, from the dense matrix
        assert layer.r["mix"] == min(r, 10)
        torch.testing.assert_close(_delta(layer, "mix"), best, atol=1e-5, rtol=1e-5)
        expected_error = (S[r:].square().sum() / S.square().sum()).sqrt().item()
        assert errors[path] == pytest.approx(expected_error, abs=1e-6)
        assert (errors[path] == 0.0) == (r >= min(10, *full.shape))  # rank of the sum


def test_combined_adapter_saves_and_loads(tmp_path):
    net = _net()
    combine_adapters(net, {"a": 0.7, "b": 0.3}, name="mix", r=5)
    set_adapter(net, "mix")
    ids = torch.randint(0, 30, (2, 4), generator=torch.Generator().manual_seed(2))
    expected = net(ids).detach()
    save_adapter(net, tmp_path, adapter_names=["mix"])
    torch.manual_seed(0)
    fresh = Net()
    load_adapter(fresh, tmp_path / "mix", adapter_name="mix")
    torch.testing.assert_close(fresh(ids), expected, atol=1e-6, rtol=1e-6)


def test_refusals():
    net = _net()
    with pytest.raises(ValueError, match="adapter 'c' not found"):
        combine_adapters(net, {"a": 0.5, "c": 0.5})
    with pytest.raises(ValueError, match="must be a finite number"):
        combine_adapters(net, {"a": float("nan")})
    with pytest.raises(ValueError, match="non-empty dict"):
        combine_adapters(net, {})
    with pytest.raises(ValueError, match="r must be a positive int"):
        combine_adapters(net, {"a": 1.0}, r=0)
    with pytest.raises(ValueError, match="'a' is already an adapter"):
        combine_adapters(net, {"a": 1.0, "b": 1.0}, name="a")
    torch.manual_seed(0)
    dora = nn.Sequential(nn.Linear(8, 8))
    apply_lora(dora, LoRAConfig(target_modules=["0"], dora=True), adapter_name="d")
    apply_lora(dora, LoRAConfig(target_modules=["0"]), adapter_name="p")
    with pytest.raises(ValueError, match="cannot combine DoRA adapters"):
        combine_adapters(dora, {"d": 0.5, "p": 0.5})
    assert "mix" not in dora[0].r


def test_adapters_with_saved_modules_tokens_or_parameters_are_refused():
    """Their full-module copies, embedding rows and parameter factors have no weighted
    sum here: combining them would save a config promising tensors that do not exist."""
    import torch.nn as nn

    from lora import LoRAConfig, apply_lora, combine_adapters

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.body(x))

    model = M()
    apply_lora(model, LoRAConfig(r=2, target_modules=["body"], modules_to_save=["head"]), "a")
    apply_lora(model, LoRAConfig(r=2, target_modules=["body"]), "b")
    before = sorted(model.state_dict())
    with pytest.raises(ValueError, match=r"\{'a': \['modules_to_save'\]\}"):
        combine_adapters(model, {"a": 0.5, "b": 0.5})
    assert sorted(model.state_dict()) == before  # nothing added


def test_adapters_with_lora_bias_are_refused():
    import torch.nn as nn

    from lora import LoRAConfig, apply_lora, combine_adapters

    model = nn.Sequential(nn.Linear(4, 4))
    apply_lora(model, LoRAConfig(r=2, target_modules=["0"], lora_bias=True), "a")
    apply_lora(model, LoRAConfig(r=2, target_modules=["0"]), "b")
    with pytest.raises(ValueError, match=r"lora_bias \(layers \['0'\]\)"):
        combine_adapters(model, {"a": 1.0, "b": 1.0})
    assert "mix" not in model[0].r
