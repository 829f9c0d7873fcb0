"""`dequantize_4bit`: 4-bit codes -> dense weight, one pass, each packed byte read once.

Each program decodes a tile of ROWS x COLS packed bytes; COLS divides blocksize / 2, so a
tile row lies inside one absmax block and needs one scale (decoded from the nested
format in the kernel when double quantization is on).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.state import QuantState

from ._format import ACT_DTYPES, check_state, decode_bytes, load_scales, scale_args
from .tuning import TileConfig, pick_config


@triton.jit
def _dequant_kernel(packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                    offset_ptr, out_ptr,
                    numel, nbytes,
                    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                    DOUBLE_QUANT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) tile row r holds bytes [r*COLS, (r+1)*COLS)
    byte_idx = rows[:, None] * COLS + tl.arange(0, COLS)[None, :]  # (ROWS, COLS)
    b = tl.load(packed_ptr + byte_idx, mask=byte_idx < nbytes, other=0)
    first = rows * (2 * COLS)  # (ROWS,) first element of each tile row
    scale = load_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                        first // BLOCKSIZE, first < numel, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    w = decode_bytes(code_ptr, b) * scale[:, None]  # (ROWS, 2 * COLS)
    elem = first[:, None] + tl.arange(0, 2 * COLS)[None, :]  # (ROWS, 2 * COLS)
    tl.store(out_ptr + elem, w.to(out_ptr.dtype.element_ty), mask=elem < numel)


def _launch(packed, state, out, cfg: TileConfig) -> None:
    cols = min(state.blocksize // 2, max(1, cfg.block_bytes // 2))  # divides blocksize / 2
    rows = max(2, cfg.block_bytes // cols)  # >= 2: no size-1 tile dimension
    nbytes = packed.numel()
    grid = (triton.cdiv(nbytes, rows * cols),)
    _dequant_kernel[grid](packed, state.code, *scale_args(state), out,
                          state.numel, nbytes,
                          BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize,
                          DOUBLE_QUANT=state.double_quant, ROWS=rows, COLS=cols,
                          num_warps=cfg.num_warps)


def dequantize_4bit(packed: torch.Tensor, state: QuantState,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight from 4-bit codes (NF4, FP4 or INT4, plain or double-quantized absmax).

    Args:
        packed: ceil(numel / 2) uint8 codes, contiguous (any shape), on the same device as the state.
        state: the `quant.QuantState` of the weight. Any numel works, including a
            partial last block.
        dtype: output dtype (float16, bfloat16 or float32); default `state.dtype`.

    Returns:
        Tensor of shape `state.shape` and dtype `dtype`, equal to
        `quant.dequantize_4bit(packed, state, dtype)` up to float32 rounding of the scale.
    """
    packed = check_state(packed, state)  # (nbytes,)
    dtype = state.dtype if dtype is None else dtype
    if dtype not in ACT_DTYPES:
        raise TypeError(f"dtype must be one of {ACT_DTYPES}, got {dtype}")
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    if out.numel() == 0:
        return out
    key = (state.numel, state.blocksize, state.double_quant, dtype)
    cfg = pick_config("dequant", key, lambda c: _launch(packed, state, out, c))
    _launch(packed, state, out, cfg)
    return out
