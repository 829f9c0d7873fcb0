"""The kernels on a CUDA GPU: bf16 and fp16 at model-sized shapes, the autotuner, dispatch.

Run by `make gpu-check` (`pytest -m cuda`); skipped where there is no CUDA. Most tests pin
one tile per kernel so that the run compiles few variants; `test_autotuned_path` times
the candidates as users get them.
"""
import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

triton = pytest.importorskip("triton")

import loralab_kernels  # noqa: E402
from loralab_kernels import dequantize_4bit as triton_dequantize  # noqa: E402
from loralab_kernels import linear_4bit, matmul_4bit, matmul_4bit_grad_input  # noqa: E402
from loralab_kernels.tuning import TileConfig, pin_config  # noqa: E402
from quant import dequantize_4bit, quantize_4bit  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.2e-2}  # max err / max |ref|
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # one unit in the last place, relative

PINS = {"dequant": TileConfig(block_bytes=4096, num_warps=4),  # gemv: the 1-row path at M = 1
        "gemv": TileConfig(block_m=1, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=3),
        "gemm": TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
        "grad_input": TileConfig(block_m=128, block_n=64, block_k=128, num_warps=8, num_stages=3)}


@pytest.fixture
def pinned():
    with pin_config("gemv", PINS["gemv"]), pin_config("gemm", PINS["gemm"]), \
            pin_config("grad_input", PINS["grad_input"]):
        yield


def _weight(n, k, double_quant=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) / k**0.5
    packed, state = quantize_4bit(w, "nf4", 64, double_quant)
    return packed, state, dequantize_4bit(packed, state, dtype=torch.float32).double()


def _close(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * want.abs().max().item(), f"{err:.3g} vs max {want.abs().max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,double_quant", [((4096, 4096), True), ((1000, 1536), False),
                                                ((333, 77), True)])
def test_dequantize(shape, double_quant, dtype):
    packed, state = quantize_4bit(torch.randn(shape, device="cuda"), "nf4", 64, double_quant)
    with pin_config("dequant", PINS["dequant"]):
        got = triton_dequantize(packed, state, dtype)
    torch.testing.assert_close(got, dequantize_4bit(packed, state, dtype=dtype), atol=0, rtol=ULP[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 4, 16, 17, 333, 2048])
def test_matmul_and_grad(pinned, m, dtype):
    packed, state, w = _weight(1000, 1536, double_quant=(m % 2 == 1))
    x = torch.randn(m, 1536, device="cuda").to(dtype)
    bias = torch.randn(1000, device="cuda").to(dtype)
    _close(matmul_4bit(x, packed, state, bias), x.double() @ w.T + bias.double(), dtype)
    gy = torch.randn(m, 1000, device="cuda").to(dtype)
    _close(matmul_4bit_grad_input(gy, packed, state), gy.double() @ w, dtype)


def test_float32_activations(pinned):
    packed, state, w = _weight(512, 1024)
    for m in (1, 8, 100):
        x = torch.randn(m, 1024, device="cuda")
        _close(matmul_4bit(x, packed, state), x.double() @ w.T, torch.float32)


@pytest.mark.parametrize("m", [1, 2048])
def test_autotuned_path(m):
    packed, state, w = _weight(4096, 4096)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    _close(matmul_4bit(x, packed, state), x.double() @ w.T, torch.bfloat16)


def test_autograd_and_auto_dispatch(pinned, monkeypatch):
    monkeypatch.delenv(loralab_kernels.ENV_VAR, raising=False)
    packed, state, w = _weight(768, 1024)
    x = torch.randn(4, 300, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert loralab_kernels.select_backend(x) == "triton" and loralab_kernels.triton_available()
    y = linear_4bit(x, packed, state, b)
    gy = torch.randn_like(y)
    y.backward(gy)
    _close(y.detach(), x.detach().double() @ w.T, torch.bfloat16)
    _close(x.grad, gy.double() @ w, torch.bfloat16)
    _close(b.grad, gy.double().sum((0, 1)), torch.bfloat16)
    monkeypatch.setenv(loralab_kernels.ENV_VAR, "torch")
    assert loralab_kernels.select_backend(x) == "torch"


def test_large_weight_gemv(pinned):
    """28672 x 8192 (235M elements): 64-bit offsets and many programs."""
    packed, state, w = _weight(28672, 8192)
    x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
    _close(matmul_4bit(x, packed, state), x.double() @ w.T, torch.bfloat16)


OPCHECK_STATES = [  # (shape (N, K), quant_type, blocksize, double_quant, dtype, bias)
    ((40, 64), "nf4", 64, True, torch.bfloat16, True),
    ((7, 33), "fp4", 64, False, torch.float16, False),  # K not a multiple of the blocksize: PyTorch
    ((96, 256), "int4", 128, True, torch.float32, False),
]


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("case", OPCHECK_STATES, ids=lambda c: f"{c[1]}-{c[0][0]}x{c[0][1]}")
def test_opcheck_cuda_kernels(pinned, case, backend):
    """torch.library.opcheck of every `loralab` op on CUDA tensors (the Triton kernels
    registered by `loralab_kernels`), forced to each backend that runs on CUDA."""
    from quant import force_backend
    from quant.ops import DEQUANTIZE, DEQUANTIZE_INTO, GRAD_INPUT, LINEAR, state_args

    (n, k), quant_type, blocksize, double_quant, dtype, bias = case
    if backend == "triton" and k % blocksize:
        pytest.skip("the Triton matmul needs in_features to be a multiple of the blocksize")
    packed, state = quantize_4bit(torch.randn(n, k, device="cuda"), quant_type, blocksize, double_quant)
    args = state_args(state)
    x = torch.randn(3, k, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True) if bias else None
    gy = torch.randn(3, n, device="cuda", dtype=dtype)
    with pin_config("dequant", PINS["dequant"]), force_backend(backend):
        torch.library.opcheck(DEQUANTIZE, (packed, *args, dtype))
        torch.library.opcheck(DEQUANTIZE_INTO, (packed, *args, torch.empty(n * k, device="cuda", dtype=dtype)))
        torch.library.opcheck(LINEAR, (x, packed, *args, b))
        torch.library.opcheck(GRAD_INPUT, (gy, packed, *args))
