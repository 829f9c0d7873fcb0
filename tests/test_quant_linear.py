"""LinearNF4 and quantize_model against dense references."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant import LinearNF4, dequantize_4bit, quantize_4bit, quantize_model

# (compute dtype, atol, rtol) of the output against a float64 reference on the same 4-bit weight
TOL = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 6e-2, 2e-2), (torch.float16, 1e-2, 5e-3)]


def make_linear(in_f, out_f, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def dense_reference(layer: LinearNF4, x):
    w = dequantize_4bit(layer.weight_packed, layer.quant_state, dtype=torch.float32).double()
    b = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), w, b)


@pytest.mark.parametrize("compute_dtype,atol,rtol", TOL)
@pytest.mark.parametrize("in_f,out_f,bias", [(128, 64, True), (41, 9, False), (341, 37, True)])
def test_forward_and_input_grad_match_dense(compute_dtype, atol, rtol, in_f, out_f, bias):
    linear = make_linear(in_f, out_f, bias)
    layer = LinearNF4.from_linear(linear, compute_dtype=compute_dtype)
    x = torch.randn(2, 5, in_f, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 5, out_f) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), dense_reference(layer, x.detach()), atol=atol, rtol=rtol)
    g = torch.randn_like(y)
    y.backward(g)
    w = layer.dequantize(torch.float32).double()
    torch.testing.assert_close(x.grad.double(), g.double() @ w, atol=atol * 4, rtol=rtol * 4)
    assert layer.weight_packed.grad is None


def test_quantized_layer_is_close_to_original():
    linear = make_linear(256, 128)
    layer = LinearNF4.from_linear(linear, compute_dtype=torch.float32)
    x = torch.randn(16, 256)
    ref = linear(x)
    rel = (layer(x) - ref).norm() / ref.norm()
    assert rel < 0.15  # NF4 error on kaiming-uniform weights, well away from the FP baseline
    assert layer.weight_dtype == torch.float32 and layer.dequantize().shape == (128, 256)


def test_backward_keeps_no_dense_weight():
    layer = LinearNF4.from_linear(make_linear(512, 256), compute_dtype=torch.float32)
    x = torch.randn(4, 512, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (torch.uint8, 512 * 256 // 2) in saved  # the packed codes
    assert not any(dt.is_floating_point and n >= 512 * 256 for dt, n in saved)
    y.sum().backward()
    assert x.grad is not None


def test_bias_is_frozen_but_differentiable_on_request():
    layer = LinearNF4.from_linear(make_linear(64, 32), compute_dtype=torch.float32)
    assert not layer.bias.requires_grad
    assert not any(p.requires_grad for p in layer.parameters())
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 7, 64)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((32,), 21.0))


def test_state_dict_roundtrip_and_buffers_move(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = LinearNF4.from_linear(make_linear(96, 48), compute_dtype=torch.float32)
    save_file(layer.state_dict(), str(tmp_path / "layer.safetensors"))
    fresh = LinearNF4(96, 48, compute_dtype=torch.float32)
    fresh.load_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    x = torch.randn(4, 96)
    torch.testing.assert_close(fresh(x), layer(x), atol=0, rtol=0)
    layer.half()  # casts the bias only; absmax and code books stay float32
    assert layer.nested_absmax.dtype == torch.float32 and layer.code_book.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), fresh.dequantize(torch.float32))


@pytest.mark.parametrize("double_quant,bits", [(False, 4.5), (True, 4.127)])
def test_memory_accounting(double_quant, bits):
    # 1000 * 1024 / 64 = 16000 absmax values: not a whole number of nested blocks of 256
    layer = LinearNF4.from_linear(make_linear(1024, 1000, bias=False), double_quant=double_quant)
    held = sum(t.untyped_storage().nbytes() for k, t in layer.state_dict().items()
               if not k.endswith("_extra_state"))  # the format tag ("nf4:64:0") is not weight storage
    assert layer.storage_bytes() == held  # the bytes the tensors' storages really hold
    assert layer.bits_per_parameter() == pytest.approx(bits, abs=2e-3)
    assert not any(b.is_floating_point() and b.numel() > 1000 * 1024 // 64 for b in layer.buffers())


def test_quantize_model_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)))
    x = torch.randn(5, 32)
    ref = model(x)
    quantize_model(model, compute_dtype=torch.float32, exclude_modules=["2.1"])
    assert isinstance(model[0], LinearNF4) and isinstance(model[2][0], LinearNF4)
    assert type(model[2][1]) is nn.Linear
    assert (model(x) - ref).norm() / ref.norm() < 0.2
    m2 = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    quantize_model(m2, target_modules=r"1")
    assert type(m2[0]) is nn.Linear and isinstance(m2[1], LinearNF4)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        quantize_model(nn.Sequential(nn.Linear(8, 8)), target_modules=["q_proj"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="compute_dtype"):
        LinearNF4(8, 8, compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="in_features"):
        LinearNF4(0, 8)
    with pytest.raises(ValueError, match="blocksize"):
        LinearNF4(64, 8, blocksize=100)
    with pytest.raises(TypeError, match="nn.Linear"):
        LinearNF4.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="in_features=16"):
        LinearNF4(16, 4)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="shape"):
        LinearNF4(16, 4, weight=torch.randn(16, 4))


def test_any_quant_type_and_packed_layout():
    w = torch.randn(24, 40)
    for qt in ("nf4", "fp4", "int4"):
        layer = LinearNF4(40, 24, bias=False, weight=w, quant_type=qt, compute_dtype=torch.float32)
        packed, state = quantize_4bit(w, quant_type=qt)
        assert torch.equal(layer.weight_packed, packed)
        assert torch.equal(layer.dequantize(), dequantize_4bit(packed, state))


def test_compiles_as_one_graph():
    layer = LinearNF4.from_linear(make_linear(64, 24), compute_dtype=torch.float32)
    x = torch.randn(3, 64, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # no graph break
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), atol=0, rtol=0)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_code_books_are_shared_by_all_layers():
    from lora.memory import code_book_bytes, nf4_storage_bytes, tensor_bytes
    from quant.codes import get_code, shared_code

    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 32, bias=False))
    quantize_model(model)
    layers = list(model)
    for name, key in (("code_book", "nf4"), ("nested_code_book", "dynamic8")):
        ptrs = {getattr(m, name).data_ptr() for m in layers}
        assert ptrs == {shared_code(key).data_ptr()}, name  # one tensor, not one per layer
    assert torch.equal(layers[0].code_book, get_code("nf4"))
    # the model's bytes: each layer's codes and scales, the bias, and the code books once
    expected = sum(nf4_storage_bytes(m.in_features * m.out_features) for m in layers)
    expected += sum(4 * m.out_features for m in layers if m.bias is not None)
    assert tensor_bytes(model)["weights"] == expected + code_book_bytes(True)
    # .half() casts the bias, never the float32 code books, and they stay shared
    model.half()
    assert {m.code_book.data_ptr() for m in layers} == {shared_code("nf4").data_ptr()}
    assert layers[0].code_book.dtype == torch.float32 and layers[0].bias.dtype == torch.float16
    x = torch.randn(3, 64)
    assert torch.isfinite(model(x.half())).all()


def test_fp4_and_int4_layers_use_their_own_code_book():
    from quant.codes import get_code

    a = LinearNF4.from_linear(make_linear(64, 8), quant_type="fp4", double_quant=False)
    b = LinearNF4.from_linear(make_linear(64, 8), quant_type="int4", double_quant=False)
    assert torch.equal(a.code_book, get_code("fp4")) and torch.equal(b.code_book, get_code("int4"))
    assert a.code_book.data_ptr() != b.code_book.data_ptr()
    assert not hasattr(a, "nested_code_book") or a.nested_code_book is None
