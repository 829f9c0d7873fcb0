"""`loralab_kernels.matmul_4bit` (GEMV and GEMM paths) and `loralab_kernels.matmul_4bit_grad_input` against
dense float64 math over the reference weight `quant.dequantize_4bit`.

Under TRITON_INTERPRET=1 `tl.dot` on bf16 is broken, so the kernels multiply bf16 in float32
there; bf16 at full speed is tested on the GPU (test_kernels_cuda.py).
"""
import pytest
import torch

pytest.importorskip("triton")

from loralab_kernels import matmul_4bit, matmul_4bit_grad_input  # noqa: E402
from loralab_kernels.tuning import TileConfig, pin_config, pinned_config  # noqa: E402
from quant import dequantize_4bit, quantize_4bit  # noqa: E402

# Max error relative to the largest |output|: the kernels round the weight tile to the
# activation dtype before a float32-accumulated dot (bf16 loose: the interpreter truncates).
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def _weight(n, k, double_quant=True, blocksize=64, quant_type="nf4", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    packed, state = quantize_4bit(w, quant_type=quant_type, blocksize=blocksize,
                                  double_quant=double_quant)
    return packed, state, dequantize_4bit(packed, state, dtype=torch.float32).double()


def _randn(*shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close_scaled(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} > {TOL[dtype]} * {scale:.3g}"


FORWARD = [  # (M, N, K, double_quant, dtype, bias): M = 1, 3 -> GEMV, M = 17 -> GEMM
    (1, 40, 64, True, torch.float32, True),
    (1, 200, 320, False, torch.float16, False),
    (3, 40, 320, True, torch.float16, True),
    (3, 200, 64, False, torch.float32, False),
    (17, 40, 320, False, torch.float16, True),
    (17, 200, 64, True, torch.float32, False),
    (17, 40, 64, True, torch.bfloat16, True),
    (1, 40, 320, False, torch.bfloat16, False),
]


@pytest.mark.parametrize("m,n,k,double_quant,dtype,bias", FORWARD)
def test_forward_matches_reference(m, n, k, double_quant, dtype, bias):
    packed, state, w = _weight(n, k, double_quant)
    x = _randn(m, k, dtype=dtype)
    b = _randn(n, dtype=dtype, seed=2) if bias else None
    want = x.double() @ w.T + (b.double() if bias else 0)  # (M, N)
    assert_close_scaled(matmul_4bit(x, packed, state, b), want, dtype)


GRAD = [  # (M, N, K, double_quant, dtype)
    (1, 40, 64, True, torch.float32),
    (3, 200, 320, False, torch.float16),
    (17, 40, 320, True, torch.float16),
    (17, 200, 64, False, torch.bfloat16),
]


@pytest.mark.parametrize("m,n,k,double_quant,dtype", GRAD)
def test_grad_input_matches_reference(m, n, k, double_quant, dtype):
    packed, state, w = _weight(n, k, double_quant)
    gy = _randn(m, n, dtype=dtype)
    assert_close_scaled(matmul_4bit_grad_input(gy, packed, state), gy.double() @ w, dtype)


# Pinned tiles: BLOCK_K below the blocksize, and BLOCK_K = 128 over two blocks with a ragged
# K tail (320 = 2 * 128 + 64); split-K on and off.
PINNED = [
    ("gemv", 1, TileConfig(block_m=1, block_n=32, block_k=128, split_k=1)),
    ("gemv", 1, TileConfig(block_m=16, block_n=32, block_k=64, split_k=2)),  # M = 1 via tl.dot
    ("gemv", 3, TileConfig(block_n=16, block_k=32, split_k=4)),
    ("gemm", 17, TileConfig(block_m=16, block_n=32, block_k=128)),
    ("grad_input", 17, TileConfig(block_m=16, block_n=32, block_k=128)),
    ("grad_input", 3, TileConfig(block_m=16, block_n=64, block_k=32)),
]


@pytest.mark.parametrize("kind,m,config", PINNED)
def test_pinned_configs_agree(kind, m, config):
    packed, state, w = _weight(40, 320, double_quant=True)
    with pin_config(kind, config):
        assert pinned_config(kind) == config
        if kind == "grad_input":
            gy = _randn(m, 40, dtype=torch.float32)
            got, want = matmul_4bit_grad_input(gy, packed, state), gy.double() @ w
        else:
            x = _randn(m, 320, dtype=torch.float32)
            got, want = matmul_4bit(x, packed, state), x.double() @ w.T
    assert pinned_config(kind) is None
    assert_close_scaled(got, want, torch.float32)


def test_pin_config_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        with pin_config("conv", TileConfig()):
            pass
    with pytest.raises(TypeError, match="config must be a TileConfig"):
        with pin_config("gemm", {"block_m": 16}):
            pass


@pytest.mark.parametrize("quant_type,blocksize", [("fp4", 32), ("int4", 128)])
def test_other_code_books_and_blocksizes(quant_type, blocksize):
    packed, state, w = _weight(24, 256, True, blocksize, quant_type)
    x = _randn(2, 256, dtype=torch.float32)
    assert_close_scaled(matmul_4bit(x, packed, state), x.double() @ w.T, torch.float32)


def test_leading_dims_and_row_strided_input():
    packed, state, w = _weight(40, 64)
    big = _randn(2, 3, 80, dtype=torch.float32)
    x = big[..., :64]  # (2, 3, 64), row stride 80: read in place
    y = matmul_4bit(x, packed, state)
    assert y.shape == (2, 3, 40)
    assert_close_scaled(y, x.double() @ w.T, torch.float32)
    assert matmul_4bit(x[:0], packed, state).shape == (0, 3, 40)


def test_bad_inputs_raise_clear_errors():
    packed, state, _ = _weight(40, 64)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="x must have dtype"):
        matmul_4bit(x.to(torch.int32), packed, state)
    with pytest.raises(ValueError, match="last dimension 64"):
        matmul_4bit(torch.randn(2, 63), packed, state)
    with pytest.raises(ValueError, match="x is on meta"):
        matmul_4bit(x.to("meta"), packed, state)
    with pytest.raises(ValueError, match="unit stride"):
        matmul_4bit(torch.randn(64, 2).T, packed, state)
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        matmul_4bit(x, packed, state, torch.randn(41))
    with pytest.raises(ValueError, match="bias must have shape"):
        matmul_4bit(x, packed, state, torch.randn(40, dtype=torch.float16))
    with pytest.raises(TypeError, match="grad_y must have dtype"):
        matmul_4bit_grad_input(torch.ones(2, 40, dtype=torch.int64), packed, state)
    with pytest.raises(ValueError, match="grad_y must have last dimension 40"):
        matmul_4bit_grad_input(torch.randn(2, 64), packed, state)
    p96, s96 = quantize_4bit(torch.randn(8, 96), blocksize=64)  # a block would span two rows
    with pytest.raises(ValueError, match="multiple of state.blocksize"):
        matmul_4bit(torch.randn(1, 96), p96, s96)
    p1d, s1d = quantize_4bit(torch.randn(128))
    with pytest.raises(ValueError, match="must be 2-D"):
        matmul_4bit(torch.randn(1, 128), p1d, s1d)
