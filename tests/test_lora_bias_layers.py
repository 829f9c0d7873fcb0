"""PEFT's `lora_bias`, `layers_to_transform` / `layers_pattern`, and DoRA on embeddings through
`apply_lora`: dense float64 references with gradients, merge / unmerge, refusals, and PEFT's
files in both directions.

Tolerances: float64 runs compare with `lora.reference.TOL[float64]` (1e-10 relative: a few
dot products of length <= 40, each rounding ~1e-16 per term). float32 runs use TOL[float32]
(1e-5 relative to the largest value: sums of <= 40 terms at 2^-24 ~ 6e-8 each, plus a merge
that rounds W + s B A once more, stays two orders below it). The 4-bit base's own error is
the same on both sides of each comparison (same codes), so it does not enter.
"""
import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora import (
    LoRAConfig,
    LoRAConv,
    LoRAEmbedding,
    LoRALinear,
    QLoRALinear,
    apply_lora,
    disable_adapters,
    load_adapter,
    save_adapter,
)
from lora.inject import in_selected_layers, layer_index, lora_layers, resolve_targets
from lora.reference import assert_close
from quant import LinearNF4


def _fill(layer, name="default", seed=0):
    """Random B and lora bias (a fresh adapter has both at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (layer.lora_B[name].weight, layer.lora_bias_of(name)):
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype))


# PEFT 0.21.2 warns on saving and loading its own lora_bias adapters: it takes the 1-D
# `lora_B.bias` for a DeepSpeed ZeRO-3 shard that was not gathered. A false alarm.
pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")

# ----- lora_bias -----

@pytest.mark.parametrize("in_f,out_f,r,base_bias", [(13, 7, 3, True), (1, 40, 1, False), (40, 5, 6, True)])
def test_lora_bias_linear_matches_dense_reference_with_gradients(in_f, out_f, r, base_bias):
    torch.manual_seed(in_f)
    base = nn.Linear(in_f, out_f, bias=base_bias, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = LoRALinear.from_layer(base, r=r, alpha=5, lora_bias=True)
    assert any("cannot be merged" in str(w.message) for w in caught) == (not base_bias)
    b = layer.lora_bias_of("default")
    assert b is not None and b.dtype == torch.float64 and not b.any()  # zero at the start, as PEFT
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # a fresh adapter is exact
    _fill(layer, seed=r)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, b)]
    xr, Ar, Br, br = leaves
    ref = xr @ base.weight.T + (base.bias if base_bias else 0) + s * (xr @ Ar.T @ Br.T + br)  # PEFT: B(A x) * s
    out = layer(x)
    assert_close(out, ref, torch.float64)
    g = torch.randn(out.shape, dtype=torch.float64)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for got, want in zip((x, A, B, b), leaves, strict=True):
        assert_close(got.grad, want.grad, torch.float64)


@pytest.mark.parametrize("keep", [False, True])
def test_lora_bias_merge_unmerge_and_refusal_without_base_bias(keep):
    torch.manual_seed(1)
    layer = LoRALinear(9, 6, r=2, alpha=3, lora_bias=True)
    layer.keep_premerge_weight = keep
    _fill(layer, seed=2)
    W0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    x = torch.randn(4, 9)
    y = layer(x)
    layer.merge()
    expected_bias = b0.double() + layer.scaling["default"] * layer.lora_bias_of("default").double()
    assert_close(layer.base_layer.bias, expected_bias, torch.float32)
    assert_close(layer(x), y, torch.float32)
    layer.unmerge()
    assert_close(layer(x), y, torch.float32)
    if keep:  # the kept copy comes back bit-exact
        assert torch.equal(layer.base_layer.weight, W0) and torch.equal(layer.base_layer.bias, b0)
    else:  # subtracting again rounds twice: within float32's rounding of |b0| + |s b|
        assert_close(layer.base_layer.bias, b0, torch.float32)
    # a base without a bias: the adapter runs, merging refuses before anything is written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nobias = LoRALinear(9, 6, r=2, bias=False, lora_bias=True)
    _fill(nobias, seed=3)
    W = nobias.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="no bias to add"):
        nobias.merge()
    assert torch.equal(nobias.base_layer.weight, W) and not nobias.merged_adapters


def test_lora_bias_safe_merge_refuses_non_finite_bias():
    layer = LoRALinear(5, 4, r=2, lora_bias=True)
    with torch.no_grad():
        layer.lora_bias_of("default")[1] = float("inf")
    W, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, W) and torch.equal(layer.base_layer.bias, b)


def test_lora_bias_next_to_a_plain_and_a_dora_adapter():
    """Several active adapters add their updates; only the one with lora_bias adds s * b."""
    torch.manual_seed(4)
    layer = LoRALinear(8, 5, r=2, alpha=2, dtype=torch.float64, base_layer=nn.Linear(8, 5, dtype=torch.float64))
    layer.add_adapter("b", r=3, alpha=6, lora_bias=True, activate=True)
    layer.add_adapter("d", r=2, alpha=2, dora=True, activate=True)
    _fill(layer, "default", 5)
    _fill(layer, "b", 6)
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        only_d = copy.deepcopy(layer)
        only_d.set_adapter(["d"])
        expected = only_d(x)  # base + DoRA's update
        for name in ("default", "b"):
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            bias = layer.lora_bias_of(name)
            expected = expected + layer.scaling[name] * (x @ A.T @ B.T + (0 if bias is None else bias))
        assert_close(layer(x), expected, torch.float64)
    with pytest.raises(ValueError, match="lora_bias=True is not supported with dora=True"):
        layer.add_adapter("x", dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="lora_bias=True, which DoRA does not support"):
        layer.enable_dora("b")
    assert "x" not in layer.r and not layer.is_dora("b")


def test_lora_bias_on_a_4bit_base():
    """QLoRALinear: same forward rule; merge adds s * b to the dense bias and unmerge restores it exactly."""
    torch.manual_seed(7)
    base = LinearNF4(64, 12, compute_dtype=torch.float32)
    layer = QLoRALinear.from_layer(base, r=4, alpha=8, lora_bias=True)
    _fill(layer, seed=8)
    b0 = base.bias.detach().clone()
    x = torch.randn(5, 64)
    A, B, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_bias_of("default")
    s = layer.scaling["default"]
    W = base.dequantize(torch.float32).double()  # the 4-bit weight as the layer uses it
    ref = x.double() @ W.T + b0.double() + s * (x.double() @ A.double().T @ B.double().T + b.double())
    assert_close(layer(x), ref, torch.float32)
    with torch.no_grad():
        layer.merge()
        assert_close(base.bias, b0.double() + s * b.double(), torch.float32)
        layer.unmerge()
        assert torch.equal(base.bias, b0)
        dense = layer.merge_and_unload()
    assert_close(dense.bias, b0.double() + s * b.double(), torch.float32)
    assert torch.equal(base.bias, b0)  # merge_and_unload leaves the 4-bit base as it was


def test_lora_bias_conv2d_against_reference_and_merge():
    torch.manual_seed(9)
    base = nn.Conv2d(3, 5, 3, padding=1, dtype=torch.float64)
    layer = LoRAConv.from_layer(base, r=2, alpha=4, lora_bias=True)
    _fill(layer, seed=10)
    A, B, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_bias_of("default")
    s = layer.scaling["default"]
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    ref = base(x) + s * (F.conv2d(F.conv2d(x, A, padding=1), B) + b[:, None, None])
    assert_close(layer(x), ref, torch.float64)
    with torch.no_grad():
        layer.merge()
        assert_close(layer(x), ref, torch.float64)
        layer.unmerge()
        assert_close(layer(x), ref, torch.float64)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.lin = nn.Linear(16, 6)
        self.out = nn.Linear(6, 3, bias=False)

    def forward(self, x):  # x (N, 2, 4, 4)
        return self.out(self.lin(self.conv(x).flatten(1)))  # conv: (N, 4, 2, 2) -> 16


def _net():
    torch.manual_seed(11)
    return _Net().eval()


def test_lora_bias_files_load_in_peft_and_back(tmp_path):
    peft = pytest.importorskip("peft")
    ours = _net()
    apply_lora(ours, LoRAConfig(r=2, alpha=4, target_modules=["conv", "lin"], lora_bias=True))
    for i, name in enumerate(("conv", "lin")):
        _fill(ours.get_submodule(name), seed=20 + i)
    x = torch.randn(3, 2, 4, 4)
    expected = ours(x).detach()
    save_adapter(ours, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {"base_model.model.conv.lora_B.bias", "base_model.model.lin.lora_B.bias"} <= set(keys)
    theirs = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "ours"))
    assert_close(theirs(x), expected, torch.float32)
    # the other way: PEFT's own lora_bias adapter, trained (randomized) there, loads here
    theirs = peft.get_peft_model(_net(), peft.LoraConfig(r=3, lora_alpha=3, target_modules=["conv", "lin"],
                                                         lora_bias=True))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_()
    theirs.eval()
    want = theirs(x).detach()
    theirs.save_pretrained(str(tmp_path / "peft"))
    back = _net()
    load_adapter(back, tmp_path / "peft")
    assert back.lin.lora_bias_of("default") is not None
    assert_close(back(x), want, torch.float32)
    # merged in PEFT and here: the same weights and biases
    merged_theirs = theirs.merge_and_unload()
    from lora.inject import merge_and_unload
    merge_and_unload(back)
    for name in ("conv", "lin"):
        for p in ("weight", "bias"):
            assert_close(getattr(back.get_submodule(name), p), getattr(merged_theirs.get_submodule(name), p),
                         torch.float32)


def test_lora_bias_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="lora_bias=True works without DoRA"):
        LoRAConfig(target_modules=["lin"], lora_bias=True, dora=True)
    with pytest.raises(ValueError, match="with the default init only"):
        LoRAConfig(target_modules=["lin"], lora_bias=True, init="gaussian")
    with pytest.raises(ValueError, match="target_parameters"):
        LoRAConfig(target_modules=[], target_parameters=["lin.weight"], lora_bias=True)
    with pytest.raises(TypeError, match="lora_bias must be a bool"):
        LoRAConfig(target_modules=["lin"], lora_bias="yes")
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.MultiheadAttention(4, 2))
    with pytest.raises(ValueError, match=r"lora_bias=True needs layers.*0 \(Embedding\).*2 \(MultiheadAttention\)"):
        apply_lora(model, LoRAConfig(target_modules=["0", "1", "2"], lora_bias=True))
    assert isinstance(model[0], nn.Embedding) and isinstance(model[1], nn.Linear)  # nothing was wrapped
    with pytest.raises(ValueError, match="init='pissa'"):
        LoRALinear(4, 4, r=2, init="pissa", lora_bias=True)
    layer = LoRALinear(4, 4, r=2, lora_bias=True)
    from lora.mixed_batch import use_adapters
    with pytest.raises(ValueError, match="mixed-batch"):
        with use_adapters(nn.Sequential(layer), ["default", "default"]):
            layer(torch.randn(2, 4))


# ----- layers_to_transform / layers_pattern -----

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.12.mlp.up_proj",
         "model.h.2.attn.q_proj", "h.0.attn.q_proj", "layers.1.q_proj", "model.layers.1.experts.0.q_proj",
         "encoder.block.3.layer.0.q_proj", "q_proj", "model.q_proj", "model.layers.x.q_proj"]
SELECTIONS = [(None, None), ([], None), (1, None), ([0, 2, 3], None), ([1], "layers"), ([0, 2], "h"),
              ([0, 3], ["block", "h"]), (0, "layer"), ([1, 12], ""), ([2], [])]


@pytest.mark.parametrize("indices,pattern", SELECTIONS)
def test_layer_selection_is_peft_rule(indices, pattern):
    """Our selection against PEFT's `check_target_module_exists`, name by name."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    targets = ["q_proj", "up_proj", "model.layers.1.self_attn.q_proj"]  # the last one in full: taken in any layer
    theirs = LoraConfig(target_modules=targets, layers_to_transform=indices, layers_pattern=pattern or None)
    theirs.layers_pattern = pattern  # PEFT reads "" and [] as "any name"; keep them as given
    ours = LoRAConfig(target_modules=targets, layers_to_transform=indices, layers_pattern=pattern)
    for name in NAMES:
        want = bool(check_target_module_exists(theirs, name))
        got = any(name == t or name.endswith("." + t) for t in targets) and in_selected_layers(ours, name)
        assert got == want, (name, indices, pattern)


def test_layer_index_examples():
    assert layer_index("model.layers.3.mlp.up", None) == 3
    assert layer_index("h.0.attn", None) is None  # PEFT wants a name before the block list
    assert layer_index("h.0.attn", "h") == 0
    assert layer_index("model.layers.1.experts.0.w", None) == 1  # the first index, not the expert's


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(12)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("indices,pattern", [([0, 2], "layers"), (3, None), ([1], ["h", "layers"])])
def test_layers_to_transform_selects_what_peft_selects_on_llama(tmp_path, indices, pattern):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=targets,
                                                           layers_to_transform=indices, layers_pattern=pattern))
    prefix = "base_model.model."
    peft_names = sorted(n[len(prefix):] for n, m in theirs.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    config = LoRAConfig(r=2, target_modules=targets, layers_to_transform=indices, layers_pattern=pattern)
    ours = _llama()
    assert sorted(apply_lora(ours, config)) == peft_names
    wanted = {indices} if isinstance(indices, int) else set(indices)
    assert {layer_index(n, pattern) for n in peft_names} == wanted and len(peft_names) == 3 * len(wanted)
    # files both ways keep the selection
    for name in peft_names:
        _fill(ours.get_submodule(name), seed=len(name))
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = ours(input_ids=ids).logits.detach()
    save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == indices and saved["layers_pattern"] == pattern
    loaded = peft.PeftModel.from_pretrained(_llama(), str(tmp_path / "ours"))
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(str(tmp_path / "peft"))
    back = _llama()
    load_adapter(back, tmp_path / "peft")
    assert sorted(n for n, m in back.named_modules() if isinstance(m, LoRALinear)) == peft_names


def test_layer_selection_config_checks_and_peft_round_trip():
    with pytest.raises(ValueError, match="needs layers_to_transform too"):
        LoRAConfig(target_modules=["q"], layers_pattern="layers")
    with pytest.raises(ValueError, match="target_modules as a list"):
        LoRAConfig(target_modules="all-linear", layers_to_transform=[0])
    with pytest.raises(ValueError, match="target_modules as a list"):
        LoRAConfig(target_modules=r".*\.q", layers_to_transform=1)
    for bad in (-1, [0, "1"], [True], 1.0):
        with pytest.raises(ValueError, match="layers_to_transform must be"):
            LoRAConfig(target_modules=["q"], layers_to_transform=bad)
    with pytest.raises(TypeError, match="layers_pattern must be"):
        LoRAConfig(target_modules=["q"], layers_to_transform=[0], layers_pattern=[1])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        LoRAConfig(target_modules=["q"], layers_to_transform=[0], layers_pattern="(")
    with pytest.raises(ValueError, match="target_parameters"):
        LoRAConfig(target_modules=[], target_parameters=["w"], layers_to_transform=[0])
    model = nn.ModuleDict({"m": nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"lin": nn.Linear(2, 2)})])})})
    assert resolve_targets(model, LoRAConfig(target_modules=["lin"], layers_to_transform=[0])) == ["m.layers.0.lin"]
    with pytest.raises(ValueError, match=r"matched no module of ModuleDict in layers_to_transform=\[3\]"):
        resolve_targets(model, LoRAConfig(target_modules=["lin"], layers_to_transform=[3]))
    # a name given in full is taken whatever its layer (PEFT's rule)
    assert resolve_targets(model, LoRAConfig(target_modules=["m.layers.0.lin"], layers_to_transform=[3])) \
        == ["m.layers.0.lin"]
    config = LoRAConfig(target_modules=["q_proj"], lora_bias=True, layers_to_transform=[1, 3], layers_pattern="h")
    d = config.to_peft_dict()
    assert (d["lora_bias"], d["layers_to_transform"], d["layers_pattern"]) == (True, [1, 3], "h")
    assert LoRAConfig.from_peft_dict(d) == config
    peft = pytest.importorskip("peft")
    theirs = peft.LoraConfig(target_modules=["q_proj"], lora_bias=True, layers_to_transform=[1, 3],
                             layers_pattern="h")
    assert LoRAConfig.from_peft(theirs) == LoRAConfig(target_modules=["q_proj"], alpha=8, lora_bias=True,
                                                      layers_to_transform=[1, 3], layers_pattern="h")


# ----- DoRA on nn.Embedding through apply_lora -----

class _EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.lin = nn.Linear(6, 4)

    def forward(self, ids):
        return self.lin(self.emb(ids))


def _emb_net():
    torch.manual_seed(13)
    return _EmbNet().eval()


def test_dora_embedding_through_apply_lora_loads_in_peft_and_back(tmp_path):
    peft = pytest.importorskip("peft")
    ours = _emb_net()
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))
    before = ours(ids).detach()
    apply_lora(ours, LoRAConfig(r=2, alpha=4, target_modules=["emb", "lin"], dora=True))
    assert isinstance(ours.emb, LoRAEmbedding) and ours.emb.is_dora("default")
    assert_close(ours(ids), before, torch.float32)  # m = ||E||: a fresh DoRA adapter changes nothing
    with torch.no_grad():  # as if trained: A (zero at the start for embeddings), B and the magnitudes
        ours.emb.lora_embedding_A["default"].normal_()
        ours.emb.lora_magnitude_vector["default"].weight.mul_(1.2)
        ours.lin.lora_B["default"].weight.normal_()
    expected = ours(ids).detach()
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_emb_net(), str(tmp_path / "ours"))
    assert_close(theirs(ids), expected, torch.float32)
    # PEFT's own DoRA embedding, changed there, loads here with the same outputs
    theirs = peft.get_peft_model(_emb_net(), peft.LoraConfig(r=3, lora_alpha=3, target_modules=["emb", "lin"],
                                                             use_dora=True))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_embedding_A" in n or "lora_B" in n:
                p.normal_()
            elif "lora_magnitude_vector" in n:
                p.mul_(0.8)
    theirs.eval()
    want = theirs(ids).detach()
    theirs.save_pretrained(str(tmp_path / "peft"))
    back = _emb_net()
    load_adapter(back, tmp_path / "peft")
    assert back.emb.is_dora("default")
    assert_close(back(ids), want, torch.float32)


# ----- the custom-model matrix's checks for the new rows: lora_bias on MLP / grouped conv / Conv3d,
# DoRA on an embedding (the other rows are in tests/test_custom_models.py) -----

class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class _GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.lin = nn.Linear(6, 2)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


class _Conv3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 2)
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3, 4)))


ROWS = {  # model, input, config
    "mlp-lora_bias": (_MLP, lambda g: torch.randn(5, 10, generator=g),
                      dict(target_modules=["lin0", "lin1"], lora_bias=True)),
    "conv2d_groups-lora_bias": (_GroupedConv, lambda g: torch.randn(2, 4, 5, 6, generator=g),
                                dict(target_modules=["conv", "lin"], lora_bias=True)),
    "conv3d-lora_bias": (_Conv3d, lambda g: torch.randn(2, 2, 3, 4, 3, generator=g),
                         dict(target_modules=["conv", "lin"], lora_bias=True)),
    "emb-dora": (_EmbNet, lambda g: torch.randint(0, 20, (3, 4), generator=g),
                 dict(target_modules=["emb", "lin"], dora=True)),
}
# bf16 / fp16 forward against the float32 model: inputs and weights rounded to 8 (11) bits, sums of
# <= 10 O(1) products, two layers: a few units of 2^-8 relative to the largest output; 3e-2 as TOL.
HALF_TOL = 3e-2


def _randomize_all(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("row", list(ROWS))
def test_new_rows_of_the_custom_model_matrix(row, tmp_path):
    peft = pytest.importorskip("peft")
    make, inputs, kwargs = ROWS[row]
    torch.manual_seed(0)
    base = make().eval()
    x = inputs(torch.Generator().manual_seed(2))
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(r=4, alpha=8, **kwargs))
    with torch.no_grad():
        expected = base(x)
        assert torch.isfinite(model(x)).all()
        assert_close(model(x), expected, torch.float32)  # a fresh adapter changes nothing
    _randomize_all(model)
    with torch.no_grad():
        out = model(x)
        assert (out - expected).abs().max() > 1e-3
        with disable_adapters(model):
            assert_close(model(x), expected, torch.float32)
        if row.startswith("conv2d_groups"):
            with pytest.raises(ValueError, match="groups=2"):
                model.conv.merge()
        else:
            for _, layer in lora_layers(model):
                layer.merge()
            assert_close(model(x), out, torch.float32)
            for _, layer in lora_layers(model):
                layer.unmerge()
        assert_close(model(x), out, torch.float32)
    save_adapter(model, tmp_path / "ours")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "ours")
    with torch.no_grad():
        assert_close(fresh(x), out, torch.float32)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
        assert_close(theirs(x), out, torch.float32)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LoRAConfig(r=4, alpha=8, **kwargs).to_peft_dict()
                                                                   | {"inference_mode": False}))
    _randomize_all(pm, seed=3)
    pm.eval()
    with torch.no_grad():
        want = pm(x)
    pm.save_pretrained(str(tmp_path / "peft"))
    back = copy.deepcopy(base)
    load_adapter(back, tmp_path / "peft")
    with torch.no_grad():
        assert_close(back(x), want, torch.float32)
    # one training step changes the adapters only
    model.train()
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)
    assert any("lora_B" in n and n.endswith("bias") for n in changed) == ("lora_bias" in kwargs)
    model.eval()
    with torch.no_grad():
        want = model(x)
        for dtype in (torch.bfloat16, torch.float16):
            half = copy.deepcopy(model).to(dtype)
            got = half(x if not x.is_floating_point() else x.to(dtype))
            assert got.dtype == dtype and torch.isfinite(got).all()
            scale = max(1.0, float(want.abs().max()))
            torch.testing.assert_close(got.double(), want.double(), atol=HALF_TOL * scale, rtol=HALF_TOL)
