"""DoRA in LoRALinear: the factored row norm, forward, gradients, merge, files, and PEFT's use_dora."""
import json

import pytest
import torch
from torch import nn

from lora import LoRAConfig, LoRALinear, apply_lora, load_adapter, save_adapter
from lora.dora import dense_row_norm, dora_linear_ref, factored_row_norm
from lora.reference import assert_close

# (dtype of W) -> (atol, rtol) of the row norm against the float64 dense reference
NORM_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-5)}


def _randomize(layer: LoRALinear, name: str = "default", seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        B = layer.lora_B[name].weight
        B.copy_(torch.randn(B.shape, generator=g, dtype=B.dtype) * 0.3)
        if layer.is_dora(name):
            m = layer.lora_magnitude_vector[name].weight
            m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g, dtype=m.dtype))


@pytest.mark.parametrize("out_f,in_f,r", [(64, 32, 4), (9, 41, 3), (1, 7, 1), (130, 17, 20)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", [0.5, 4.0])
def test_factored_row_norm_matches_dense(out_f, in_f, r, dtype, scaling):
    g = torch.Generator().manual_seed(out_f * in_f + r)
    W = torch.randn(out_f, in_f, generator=g).to(dtype)
    A = torch.randn(r, in_f, generator=g) / in_f ** 0.5
    B = torch.randn(out_f, r, generator=g)
    expected = torch.linalg.vector_norm(W.double() + scaling * (B.double() @ A.double()), dim=1)
    atol, rtol = NORM_TOL[dtype]
    for got in (factored_row_norm(W, A, B, scaling), dense_row_norm(W, A, B, scaling)):
        torch.testing.assert_close(got.double(), expected, atol=atol * float(expected.max()), rtol=rtol)


def test_factored_row_norm_clamps_cancelling_rows():
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    A = torch.eye(2)
    B = -W.clone()  # W + B A = 0: the expanded square may round below zero
    got = factored_row_norm(W, A, B, 1.0)
    assert torch.isfinite(got).all() and got.abs().max() < 1e-3


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_dora_layer_equals_base(bias, dtype):
    torch.manual_seed(0)
    base = nn.Linear(19, 11, bias=bias).to(dtype)
    x = torch.randn(3, 5, 19).to(dtype)
    expected = base(x)
    layer = LoRALinear.from_layer(base, r=4, alpha=8, dora=True)
    m = layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(m.double(), torch.linalg.vector_norm(base.weight.double(), dim=1),
                               atol=1e-5, rtol=1e-5)
    assert_close(layer(x), expected, dtype)


@pytest.mark.parametrize("shape", [(2, 8, 32, 16), (1, 3, 41, 9)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rslora", [False, True])
def test_dora_forward_and_grads_match_reference(shape, dtype, rslora):
    bsz, seq, fin, fout = shape
    torch.manual_seed(1)
    layer = LoRALinear(fin, fout, r=4, alpha=8, rslora=rslora, dora=True).to(dtype)
    for p in layer.parameters():  # adapters back in float32 for low-precision bases (as add_adapter does)
        if p.requires_grad and dtype != torch.float64:
            p.data = p.data.float()
    _randomize(layer)
    x = torch.randn(bsz, seq, fin).to(dtype)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    out = layer(x)
    assert out.dtype == dtype and out.shape == (bsz, seq, fout)
    Ar, Br, mr = (t.detach().double().requires_grad_(True) for t in (A, B, m))
    ref = dora_linear_ref(x, layer.base_layer.weight, layer.base_layer.bias, Ar, Br, mr, layer.scaling["default"])
    assert_close(out, ref, dtype)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).double()
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    tol_dtype = torch.float32 if dtype == torch.bfloat16 else dtype  # grads are float32 adapters
    loose = dtype == torch.bfloat16  # bf16 activations: compare with the bf16 table
    for got, want in ((A.grad, Ar.grad), (B.grad, Br.grad), (m.grad, mr.grad)):
        assert_close(got, want, torch.bfloat16 if loose else tol_dtype)


def test_norm_is_detached_from_the_graph():
    """DoRA sec. 4.3: with the norm treated as a constant, dy/dB is (m/n) * s * x A^T only."""
    torch.manual_seed(3)
    layer = LoRALinear(6, 5, r=2, alpha=2, dora=True)
    _randomize(layer)
    x = torch.randn(4, 6)
    layer(x).sum().backward()
    scale = (layer.lora_magnitude_vector["default"].weight / layer.row_norm("default")).detach()  # (out,)
    A = layer.lora_A["default"].weight.detach()
    expected = scale[:, None] * layer.scaling["default"] * (torch.ones(4, 5).T @ (x @ A.T))  # (out, r)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_dora_merge_unmerge(dtype, fan_in_fan_out):
    torch.manual_seed(4)
    base = nn.Linear(23, 13).to(dtype)
    if fan_in_fan_out:  # a Conv1D-like layer: weight stored (in, out)
        class Conv1DLike(nn.Module):
            def __init__(self, lin):
                super().__init__()
                self.in_features, self.out_features = lin.in_features, lin.out_features
                self.weight = nn.Parameter(lin.weight.detach().T.contiguous())
                self.bias = lin.bias

            def forward(self, x):
                return x @ self.weight + self.bias
        base = Conv1DLike(base)
    layer = LoRALinear.from_layer(base, r=3, alpha=6, dora=True, fan_in_fan_out=fan_in_fan_out)
    _randomize(layer)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(7, 23).to(dtype)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    merged = layer(x)
    assert_close(merged, unmerged, dtype)
    layer.unmerge()
    assert_close(layer.base_layer.weight, w0, dtype)
    assert_close(layer(x), unmerged, dtype)  # the cached ||W||^2 follows the restored weight


def test_dora_merge_known_answer():
    layer = LoRALinear(2, 2, r=1, alpha=1, bias=False, dora=True)
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[0.0], [2.0]]))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor([10.0, 1.0]))
    layer.merge()
    # rows of W + BA: [3, 4] (norm 5) and [2, 2] (norm 2*sqrt 2), rescaled to norms 10 and 1
    s = 2 ** -0.5
    torch.testing.assert_close(layer.base_layer.weight.detach(), torch.tensor([[6.0, 8.0], [s, s]]))


def _tiny():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))


def test_peft_use_dora_same_outputs_and_grads():
    peft = pytest.importorskip("peft")
    ours, theirs = _tiny(), _tiny()
    apply_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["0", "2"], dora=True))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                         use_dora=True))
    for name in ("0", "2"):
        ol, tl = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        _randomize(ol, seed=int(name) + 7)
        with torch.no_grad():
            tl.lora_A["default"].weight.copy_(ol.lora_A["default"].weight)
            tl.lora_B["default"].weight.copy_(ol.lora_B["default"].weight)
            tl.lora_magnitude_vector["default"].weight.copy_(ol.lora_magnitude_vector["default"].weight)
    x = torch.randn(5, 12)
    out_o, out_t = ours(x), theirs(x)
    torch.testing.assert_close(out_o, out_t, atol=1e-5, rtol=1e-5)
    out_o.square().sum().backward()
    out_t.square().sum().backward()
    for name in ("0", "2"):
        ol, tl = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        for key in ("lora_A", "lora_B", "lora_magnitude_vector"):
            torch.testing.assert_close(getattr(ol, key)["default"].weight.grad,
                                       getattr(tl, key)["default"].weight.grad, atol=1e-5, rtol=1e-4)


def test_dora_files_round_trip_and_peft_reads_them(tmp_path):
    peft = pytest.importorskip("peft")
    model = _tiny()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["0", "2"], dora=True))
    for name in ("0", "2"):
        _randomize(model.get_submodule(name), seed=int(name) + 11)
    x = torch.randn(3, 12)
    expected = model(x).detach()
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    fresh = _tiny()
    load_adapter(fresh, tmp_path)
    assert fresh.get_submodule("0").is_dora("default")
    torch.testing.assert_close(fresh(x), expected)
    theirs = peft.PeftModel.from_pretrained(_tiny(), str(tmp_path), is_trainable=False)
    torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-5)
    # ... and PEFT's own file loads here
    peft_dir = tmp_path / "peft"
    theirs.save_pretrained(str(peft_dir))
    again = _tiny()
    load_adapter(again, peft_dir)
    torch.testing.assert_close(again(x), expected, atol=1e-5, rtol=1e-5)


def test_dora_on_embeddings_through_apply_lora_and_refused_on_4bit():
    from lora import LoRAEmbedding, QLoRALinear
    from quant import LinearNF4
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    ids = torch.tensor([[1, 2, 9], [0, 0, 3]])
    before = model(ids)
    apply_lora(model, LoRAConfig(target_modules=["0", "1"], dora=True))
    assert isinstance(model[0], LoRAEmbedding) and model[0].is_dora("default") and model[1].is_dora("default")
    torch.testing.assert_close(model(ids), before, atol=1e-6, rtol=1e-6)  # a fresh DoRA adapter changes nothing
    # 4-bit layers have no dense weight to take norms of: refused before anything is wrapped
    model = nn.Sequential(nn.Embedding(10, 64), LinearNF4(64, 8))
    with pytest.raises(ValueError, match=r"dora=True needs layers with a dense float weight.*1 \(Linear4bit\)"):
        apply_lora(model, LoRAConfig(target_modules=["0", "1"], dora=True))
    assert isinstance(model[0], nn.Embedding) and isinstance(model[1], LinearNF4)  # nothing was wrapped
    with pytest.raises(TypeError, match="DoRA needs a dense float base weight"):
        QLoRALinear.from_layer(LinearNF4(64, 8)).enable_dora("default")
    with pytest.raises(TypeError, match="dora must be a bool"):
        LoRAConfig(target_modules=["1"], dora="yes")


def test_dora_next_to_a_plain_adapter_and_weight_edits():
    torch.manual_seed(6)
    layer = LoRALinear(10, 7, r=2, alpha=4)
    layer.add_adapter("d", r=3, alpha=3, dora=True, activate=True)
    assert layer.active_adapters == ["default", "d"] and layer.is_dora("d") and not layer.is_dora("default")
    _randomize(layer, "default", seed=7)
    _randomize(layer, "d", seed=8)
    x = torch.randn(4, 10)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A1, B1 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A2, B2 = layer.lora_A["d"].weight, layer.lora_B["d"].weight
    m = layer.lora_magnitude_vector["d"].weight
    # each adapter adds its own update to the base output (PEFT's rule for several active adapters)
    plain = layer.scaling["default"] * (x.double() @ (B1.double() @ A1.double()).T)
    dora = dora_linear_ref(x, W, None, A2, B2, m, layer.scaling["d"])
    assert_close(layer(x), x.double() @ W.double().T + b.double() + plain + (dora - x.double() @ W.double().T),
                 torch.float32)
    with torch.no_grad():  # an in-place edit of the frozen weight invalidates the cached ||W||^2
        W.mul_(2.0)
    torch.testing.assert_close(layer.row_norm("d"), dense_row_norm(W, A2, B2, layer.scaling["d"]),
                               atol=1e-5, rtol=1e-5)
    from lora import QLoRALinear
    from quant import LinearNF4
    with pytest.raises(TypeError, match="dora"):  # QLoRALinear.add_adapter has no dora argument (yet)
        QLoRALinear.from_layer(LinearNF4(64, 8)).add_adapter("x", dora=True)
