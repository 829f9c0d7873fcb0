"""`loralab_kernels.dequantize_4bit` against the pure-PyTorch reference `quant.dequantize_4bit`.

Runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py sets it when there is no CUDA).
"""
import pytest
import torch

pytest.importorskip("triton")

from loralab_kernels import dequantize_4bit as triton_dequantize  # noqa: E402
from loralab_kernels.tuning import TileConfig, pin_config  # noqa: E402
from quant import dequantize_4bit, quantize_4bit  # noqa: E402

# The interpreter casts float32 -> bfloat16 by truncation, the reference rounds to nearest:
# allow one bf16 ulp (2**-7 relative). float32 and float16 must match exactly.
RTOL = {torch.float32: 0.0, torch.float16: 0.0, torch.bfloat16: 2.0**-7}

CASES = [  # (shape, blocksize, double_quant, quant_type)
    ((40, 64), 64, True, "nf4"),
    ((7, 33), 64, False, "nf4"),  # odd numel: a partial last block and a padding nibble
    ((200, 320), 32, True, "fp4"),
    ((3, 1000), 128, False, "int4"),
    ((5, 130, 3), 64, True, "nf4"),  # 3-D, 1950 elements: 31 blocks, last one partial
]


def _quantized(shape, blocksize=64, double_quant=True, quant_type="nf4", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g)
    return quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,blocksize,double_quant,quant_type", CASES)
def test_matches_reference(shape, blocksize, double_quant, quant_type, dtype):
    packed, state = _quantized(shape, blocksize, double_quant, quant_type)
    got = triton_dequantize(packed, state, dtype)
    want = dequantize_4bit(packed, state, dtype=dtype)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=0.0, rtol=RTOL[dtype])


def test_default_dtype_is_state_dtype():
    w = torch.randn(16, 64, dtype=torch.float16)
    packed, state = quantize_4bit(w)
    assert triton_dequantize(packed, state).dtype == torch.float16


def test_nested_absmax_decoded_in_kernel():
    """Double quantization changes the scales: the kernel must follow the nested format."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=g)
    p_plain, s_plain = quantize_4bit(w, double_quant=False)
    p_dq, s_dq = quantize_4bit(w, double_quant=True)
    plain = triton_dequantize(p_plain, s_plain, torch.float32)
    nested = triton_dequantize(p_dq, s_dq, torch.float32)
    torch.testing.assert_close(nested, dequantize_4bit(p_dq, s_dq, dtype=torch.float32), atol=0, rtol=0)
    assert not torch.equal(plain, nested)  # 8-bit absmax differs from the float32 one
    torch.testing.assert_close(plain, nested, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("block_bytes", [16, 64, 4096])
def test_pinned_tile_sizes_agree(block_bytes):
    packed, state = _quantized((9, 192), blocksize=64, double_quant=True)
    want = dequantize_4bit(packed, state, dtype=torch.float32)
    with pin_config("dequant", TileConfig(block_bytes=block_bytes, num_warps=1)):
        got = triton_dequantize(packed, state, torch.float32)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_accepts_bitsandbytes_packed_shape():
    packed, state = _quantized((8, 64))
    got = triton_dequantize(packed.view(-1, 1), state, torch.float32)  # bitsandbytes keeps (n // 2, 1)
    torch.testing.assert_close(got, dequantize_4bit(packed, state, dtype=torch.float32), atol=0, rtol=0)


def test_any_code_book_is_looked_up():
    """Every one of the 16 levels comes from state.code (distinct random levels here)."""
    packed = torch.arange(256, dtype=torch.uint8).repeat(2)  # every byte value: all 16 x 16 pairs
    _, state = quantize_4bit(torch.randn(8, 128), double_quant=False)
    state.code = torch.randn(16, generator=torch.Generator().manual_seed(3))
    got = triton_dequantize(packed, state, torch.float32)
    torch.testing.assert_close(got, dequantize_4bit(packed, state, dtype=torch.float32), atol=0, rtol=0)
    scale = state.absmax.repeat_interleave(64)[:512]  # (512,) the block scale of each element
    assert torch.equal(got.reshape(-1)[:512:2], state.code[torch.arange(256) >> 4] * scale[::2])
    assert torch.equal(got.reshape(-1)[1:512:2], state.code[torch.arange(256) & 15] * scale[1::2])


def test_bad_inputs_raise_clear_errors():
    packed, state = _quantized((8, 64))
    with pytest.raises(TypeError, match="packed must be uint8"):
        triton_dequantize(packed.float(), state)
    with pytest.raises(ValueError, match="packed has 255 bytes"):
        triton_dequantize(packed[:-1], state)
    with pytest.raises(ValueError, match="packed must be contiguous"):
        triton_dequantize(torch.stack([packed, packed], 1)[:, 0], state)
    with pytest.raises(TypeError, match="state must be a quant.QuantState"):
        triton_dequantize(packed, {"absmax": state.absmax})
    with pytest.raises(TypeError, match="dtype must be one of"):
        triton_dequantize(packed, state, torch.int32)
    with pytest.raises(ValueError, match="state.absmax is on meta"):
        state.absmax = state.absmax.to("meta")
        triton_dequantize(packed, state)
    packed, state = _quantized((8, 64))
    state.blocksize = 48
    with pytest.raises(ValueError, match="power of two"):
        triton_dequantize(packed, state)
    packed, state = _quantized((8, 64))
    state.quant_type = "nf5"
    with pytest.raises(ValueError, match="quant_type must be one of"):
        triton_dequantize(packed, state)
