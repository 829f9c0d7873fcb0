"""LinearNF4 and QLoRALinear run the Triton kernels when asked (on CUDA by default; here
forced with `quant.force_backend("triton")` under the interpreter) and PyTorch otherwise,
with the same numbers."""
import pytest
import torch

import loralab_kernels
import loralab_kernels.grad
import loralab_kernels.matmul
from lora import LoRAConfig, QLoRALinear, apply_lora
from quant import LinearNF4, force_backend


def test_importing_kernels_registers_the_cuda_kernels():
    for name in ("loralab::linear_4bit", "loralab::linear_4bit_grad_input"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


def _run(layer, x, backend):
    x = x.clone().requires_grad_(True)
    with force_backend(backend):
        y = layer(x)
        y.square().sum().backward()
    return y, x.grad


def _count_launches(monkeypatch):
    calls = []
    for module, name in ((loralab_kernels.matmul, "matmul_4bit"), (loralab_kernels.grad, "matmul_4bit_grad_input")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    return calls


@pytest.mark.parametrize("wrap", [False, True], ids=["LinearNF4", "QLoRALinear"])
def test_layers_dispatch_to_triton_and_match_torch(wrap, monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 40, bias=True)
    layer = LinearNF4.from_linear(linear, compute_dtype=torch.float32)
    if wrap:
        model = torch.nn.Sequential(layer)
        apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["0"]))
        layer = model[0]
        assert isinstance(layer, QLoRALinear)
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(3, 128)
    calls = _count_launches(monkeypatch)
    y_t, g_t = _run(layer, x, "torch")
    assert calls == [] and y_t.grad_fn is not None
    y_k, g_k = _run(layer, x, "triton")
    assert calls == ["matmul_4bit", "matmul_4bit_grad_input"]  # forward and backward in Triton
    torch.testing.assert_close(y_k, y_t, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g_k, g_t, atol=1e-4, rtol=1e-4)


def test_merge_and_unload_passes_each_layer_its_own_arguments():
    """`requantize=True` reaches the 4-bit layers; plain LoRA layers beside them merge as usual."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    model[2] = LinearNF4.from_linear(model[2], compute_dtype=torch.float32)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["0", "2"]))
    from lora import merge_and_unload
    with pytest.raises(TypeError, match="no LoRA layer takes"):
        merge_and_unload(model, requantise=True)
    merge_and_unload(model, requantize=True)
    assert type(model[0]) is torch.nn.Linear and isinstance(model[2], LinearNF4)
