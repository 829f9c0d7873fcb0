"""Reading the `quant/` 4-bit format inside Triton kernels, plus the input checks that
every launcher shares.

Layout (see `quant/state.py`): a weight `W` of shape (N, K) is flattened row-major;
element `2i` is the high nibble of byte `i`, element `2i + 1` the low nibble. Block `b`
of `blocksize` consecutive elements has one scale `absmax[b]`, stored as float32, or with
double quantization (QLoRA sec. 3) as a uint8 code into `nested_code`, giving
`nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset`.

Decoding looks levels up in the 16-entry float32 code book itself (`state.code`, so FP4
and INT4 work too). Its 64 bytes sit in one cache line, so a warp's 32 lookups are served
as one L1 request whatever the codes; a 256-entry table of byte pairs would halve the
lookups but spread them over 16 lines (2 KiB), i.e. up to 16 requests per warp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.state import QuantState

from .dispatch import ACT_DTYPES  # noqa: F401  (defined once, where no triton import is needed)


def check_state(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Raise a clear error when `packed`/`state` are not a 4-bit tensor the kernels can read.

    Returns `packed` as a 1-D view (bitsandbytes stores it as `(n // 2, 1)`).
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a quant.QuantState, got {type(state).__name__}")
    # Every field, length, dtype and device: the one check that quant's own paths run too.
    state.validate(packed)
    # The kernels index raw pointers with unit strides.
    if not packed.is_contiguous():
        raise ValueError(f"packed must be contiguous, got shape {tuple(packed.shape)} "
                         f"with strides {packed.stride()}")
    for name in ("absmax", "code", "nested_absmax", "nested_code", "offset"):
        t = getattr(state, name)
        if t is not None and not t.is_contiguous():
            raise ValueError(f"state.{name} must be contiguous")
    return packed.reshape(-1)


def scale_args(state: QuantState) -> tuple:
    """The pointers a kernel needs to read block scales (dummies when not double-quantized)."""
    if state.double_quant:
        return state.absmax, state.nested_code, state.nested_absmax, state.offset
    return state.absmax, state.absmax, state.absmax, state.absmax


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile) in grouped order (Triton tutorial 03): GROUP_M
    consecutive programs take consecutive row tiles of one column tile, so they share it in L2."""
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    return pid_m, pid_n


@triton.jit
def decode_bytes(code_ptr, packed_bytes):
    """(R, C) uint8 codes -> (R, 2C) float32 levels, element 2i from the high nibble of byte i."""
    b = packed_bytes.to(tl.int32)
    hi = tl.load(code_ptr + (b >> 4))  # (R, C): levels of elements 2i
    lo = tl.load(code_ptr + (b & 15))  # (R, C): levels of elements 2i + 1
    return tl.interleave(hi, lo)


@triton.jit
def load_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, block_idx, mask,
                NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """float32 absmax of blocks `block_idx` (any shape); the nested format is decoded here."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block_idx, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block_idx // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return tl.load(nested_code_ptr + q) * nested + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block_idx, mask=mask, other=0.0)


@triton.jit
def load_weight_bytes(packed_ptr, offs_n, k0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed bytes of W[offs_n, k0:k0 + BLOCK_K], (BLOCK_N, BLOCK_K // 2) uint8.

    Needs K even (each row starts on a byte); rows >= N and columns >= K read as byte 0.
    """
    offs_b = tl.arange(0, BLOCK_K // 2)
    # First byte of each row's tile. A multiple of 16 because K is a multiple of the blocksize
    # (>= 32) and k0 of BLOCK_K (>= 32): the hint lets each thread load 16 bytes at once.
    start = tl.multiple_of(offs_n.to(tl.int64) * (K // 2) + k0 // 2, 16)  # (BLOCK_N,)
    mask = (offs_n[:, None] < N) & ((k0 + 2 * offs_b[None, :]) < K)
    return tl.load(packed_ptr + start[:, None] + offs_b[None, :], mask=mask, other=0)


@triton.jit
def load_weight_codes(packed_ptr, code_ptr, offs_n, k0, N, K,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Unscaled levels of W[offs_n, k0:k0 + BLOCK_K] as float32, (BLOCK_N, BLOCK_K)."""
    return decode_bytes(code_ptr, load_weight_bytes(packed_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K))


@triton.jit
def load_weight_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, offs_n, k0, N, K,
                       BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                       DOUBLE_QUANT: tl.constexpr, GROUPS: tl.constexpr):
    """Scales of W[offs_n, k0:k0 + BLOCK_K] with GROUPS = max(1, BLOCK_K // BLOCKSIZE):
    (BLOCK_N,) when the tile lies inside one block (GROUPS == 1), else (BLOCK_N, GROUPS).

    Needs K % BLOCKSIZE == 0, so that a block never spans two rows.
    """
    first = (offs_n.to(tl.int64) * K + k0) // BLOCKSIZE  # (BLOCK_N,) block of the tile's first column
    if GROUPS == 1:
        return load_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, first,
                           offs_n < N, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    else:
        offs_g = tl.arange(0, GROUPS)
        mask = (offs_n[:, None] < N) & ((k0 + offs_g[None, :] * BLOCKSIZE) < K)
        return load_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                           first[:, None] + offs_g[None, :], mask, NESTED_BLOCKSIZE, DOUBLE_QUANT)


@triton.jit
def scale_codes(codes, scales, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr):
    """codes (BLOCK_N, BLOCK_K) times the scales of `load_weight_scales`, each scale over
    BLOCK_K // GROUPS columns."""
    if GROUPS == 1:
        return codes * scales[:, None]
    else:
        w = tl.reshape(codes, (BLOCK_N, GROUPS, BLOCK_K // GROUPS)) * scales[:, :, None]
        return tl.reshape(w, (BLOCK_N, BLOCK_K))  # (BLOCK_N, BLOCK_K)


@triton.jit
def sum_scaled_blocks(prod, scales, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr,
                      GROUPS: tl.constexpr):
    """Row sums of prod (BLOCK_N, WIDTH), each block's partial sum times its scale once:
    sum_g scales[n, g] * sum_{columns c of block g} prod[n, c] -> (BLOCK_N,)."""
    if GROUPS == 1:
        return tl.sum(prod, axis=1) * scales
    else:
        per_block = tl.sum(tl.reshape(prod, (BLOCK_N, GROUPS, WIDTH // GROUPS)), axis=2)
        return tl.sum(per_block * scales, axis=1)  # per_block: (BLOCK_N, GROUPS)


@triton.jit
def dot_acc(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b. DOT_FP32 multiplies in float32 at full precision (fp32 inputs, and bf16 under
    the interpreter, whose bf16 `tl.dot` is broken)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
