"""`loralab_kernels.linear_4bit`: forward and backward through the Triton kernels against float64
autograd over the reference weight, and the run-time choice of backend."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import loralab_kernels  # noqa: E402
import loralab_kernels.matmul  # noqa: E402
from loralab_kernels import ENV_VAR, linear_4bit, select_backend, triton_available  # noqa: E402
from quant import dequantize_4bit, quantize_4bit  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}  # max error / max |reference|


def _close(got, want, dtype):
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * want.abs().max().item(), err


@pytest.mark.parametrize("m,dtype,double_quant", [(1, torch.float32, True), (3, torch.float16, False),
                                                  (17, torch.float32, False), (17, torch.float16, True)])
def test_forward_backward_match_float64_autograd(m, dtype, double_quant):
    g = torch.Generator().manual_seed(m)
    n, k = 40, 320
    packed, state = quantize_4bit(torch.randn(n, k, generator=g) / k**0.5, double_quant=double_quant)
    x = torch.randn(2, m, k, generator=g).to(dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(dtype).requires_grad_()
    y = linear_4bit(x, packed, state, b, backend="triton")
    gy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(gy)

    w = dequantize_4bit(packed, state, dtype=torch.float32).double()
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    y64 = torch.nn.functional.linear(x64, w, b64)  # (2, M, N)
    y64.backward(gy.double())
    _close(y.detach(), y64.detach(), dtype)
    _close(x.grad, x64.grad, dtype)
    _close(b.grad, b64.grad, dtype)


def test_only_bias_needs_grad_and_weight_stays_frozen():
    packed, state = quantize_4bit(torch.randn(24, 64))
    before = packed.clone()
    x = torch.randn(5, 64)
    b = torch.zeros(24, requires_grad=True)
    linear_4bit(x, packed, state, b, backend="triton").sum().backward()
    assert x.grad is None
    torch.testing.assert_close(b.grad, torch.full((24,), 5.0))
    assert torch.equal(packed, before) and not packed.requires_grad


def test_torch_backend_is_the_reference():
    packed, state = quantize_4bit(torch.randn(24, 64))
    x = torch.randn(3, 64)
    want = x @ dequantize_4bit(packed, state, dtype=torch.float32).T
    torch.testing.assert_close(linear_4bit(x, packed, state, backend="torch"), want)


def test_backend_selection(monkeypatch):
    x = torch.randn(2, 4)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert select_backend(x) == "torch"  # auto: CPU input -> pure PyTorch
    monkeypatch.setenv(ENV_VAR, "triton")
    assert select_backend(x) == "triton"  # works on CPU because the interpreter is on
    monkeypatch.setenv(ENV_VAR, "torch")
    assert select_backend(x) == "torch"
    assert select_backend(x, backend="triton") == "triton"  # the argument beats the variable
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="LORALAB_BACKEND must be one of"):
        select_backend(x)
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend(x, backend="fast")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        select_backend(x, backend="triton")


def test_env_var_routes_linear_4bit(monkeypatch):
    packed, state = quantize_4bit(torch.randn(24, 64))
    x = torch.randn(3, 64)
    calls = []
    original = loralab_kernels.matmul.matmul_4bit
    monkeypatch.setattr(loralab_kernels.matmul, "matmul_4bit", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv(ENV_VAR, "torch")
    linear_4bit(x, packed, state)
    assert calls == []
    monkeypatch.setenv(ENV_VAR, "triton")
    linear_4bit(x, packed, state)
    assert calls == [1]


def test_auto_falls_back_for_unsupported_layers(monkeypatch):
    """in_features not a multiple of the blocksize: `auto` uses PyTorch, a forced `triton` raises."""
    packed, state = quantize_4bit(torch.randn(8, 96), blocksize=64)
    x = torch.randn(2, 96)
    assert not loralab_kernels.dispatch.supports(x, [8, 96], 64, None)
    assert loralab_kernels.dispatch.supports(x, [8, 128], 64, None)
    want = x @ dequantize_4bit(packed, state, dtype=torch.float32).T
    torch.testing.assert_close(linear_4bit(x, packed, state), want)  # auto (variable unset)
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match="multiple of state.blocksize"):
        linear_4bit(x, packed, state)


def test_triton_available_without_triton(monkeypatch):
    assert triton_available() is True  # the interpreter is on in this test run
    monkeypatch.setattr(loralab_kernels._backend, "_triton_importable", lambda: False)
    assert triton_available() is False
    assert select_backend(torch.randn(1)) == "torch"
    with pytest.raises(RuntimeError, match="triton does not import"):
        select_backend(torch.randn(1), backend="triton")
    monkeypatch.setattr(loralab_kernels.dispatch, "_triton_importable", lambda: False)
    packed, state = quantize_4bit(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="triton does not import"):
        linear_4bit(torch.randn(2, 64), packed, state, backend="triton")


def test_package_imports_without_triton():
    """`import loralab_kernels` and `triton_available()` must work on a machine without Triton."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import loralab_kernels\n"
            "assert loralab_kernels.triton_available() is False\n"
            "import torch; assert loralab_kernels.select_backend(torch.zeros(1)) == 'torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bitsandbytes_imports_beside_kernels():
    """bitsandbytes tries `from kernels import get_kernel` (a Hugging Face package of the
    same name) on some CPUs, inside a try/except; our package must not break it."""
    bnb = pytest.importorskip("bitsandbytes")
    assert loralab_kernels.triton_available() in (True, False)
    assert hasattr(bnb, "functional")
