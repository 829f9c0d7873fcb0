"""`matmul_4bit(x, packed, state, bias)` = `x @ dequantize(W).T + bias` without materializing W.

Two kernels share the weight-tile readers of `_format`:

- GEMV / split-K (M <= `GEMV_MAX_M`, decoding): memory-bound, so each program streams a
  narrow strip of W once. For M = 1 it multiplies the unscaled levels by x, sums each
  quantization block, and applies the block's scale once to that sum; for 2 <= M <= 16 it
  feeds a 16-row `tl.dot`. `split_k` programs share an output tile along K and write
  float32 partials that are summed afterwards (deterministic, no atomics).
- Tiled GEMM (larger M): Triton tutorial 03's grouped tiling with the dequantization of
  the W tile inside the K loop and float32 accumulation.

Requirements: W is 2-D (N, K) with K a multiple of `state.blocksize` (true of every
linear layer with the default blocksize 64), so that no block spans two rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.state import QuantState

from ._backend import interpreter_enabled
from ._format import (
    ACT_DTYPES,
    check_state,
    dot_acc,
    grouped_tile,
    load_weight_codes,
    load_weight_scales,
    scale_args,
    scale_codes,
    sum_scaled_blocks,
)
from .tuning import TileConfig, pick_config

GEMV_MAX_M = 16  # rows of x up to which the GEMV path runs (decoding batch sizes)


@triton.jit(do_not_specialize=["M"])  # one compile for every row count
def _gemv_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                 offset_ptr, bias_ptr, out_ptr,
                 M, N, K,
                 stride_xm, stride_os, stride_om,
                 BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                 DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUPS: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        scales = load_weight_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                                    offs_n, k0, N, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT,
                                    GROUPS)  # (BLOCK_N,) or (BLOCK_N, GROUPS)
        codes = load_weight_codes(packed_ptr, code_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K)
        mask_k = (k0 + offs_k) < K
        if BLOCK_M == 1:
            x = tl.load(x_ptr + k0 + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # (BLOCK_K,)
            # One sum per quantization block, then the block's scale applied once to it.
            acc += sum_scaled_blocks(codes * x[None, :], scales, BLOCK_N, BLOCK_K, GROUPS)
        else:
            offs_m = tl.arange(0, BLOCK_M)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                        mask=(offs_m[:, None] < M) & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            w = scale_codes(codes, scales, BLOCK_N, BLOCK_K, GROUPS).to(x.dtype)  # (BLOCK_N, BLOCK_K)
            acc = dot_acc(x, tl.trans(w), acc, DOT_FP32)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)  # float32 partials when SPLIT_K > 1 (summed by the launcher)
    if BLOCK_M == 1:
        tl.store(out_ptr + pid_s * stride_os + offs_n, out, mask=offs_n < N)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :], out,
                 mask=mask)


@triton.jit(do_not_specialize=["M"])  # one compile for every row count
def _gemm_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                 offset_ptr, bias_ptr, out_ptr,
                 M, N, K,
                 stride_xm, stride_om,
                 BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                 DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUPS: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped program order (Triton tutorial 03): GROUP_M row tiles share each W tile in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_rows + (k0 + offs_k)[None, :],
                    mask=(offs_m[:, None] < M) & ((k0 + offs_k)[None, :] < K), other=0.0)
        codes = load_weight_codes(packed_ptr, code_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K)
        scales = load_weight_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                                    offs_n, k0, N, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT,
                                    GROUPS)
        w = scale_codes(codes, scales, BLOCK_N, BLOCK_K, GROUPS).to(x.dtype)  # (BLOCK_N, BLOCK_K)
        acc = dot_acc(x, tl.trans(w), acc, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def dot_fp32(dtype: torch.dtype) -> bool:
    """Whether `tl.dot` must run in float32: fp32 inputs (no TF32 rounding), and bf16 under
    the interpreter, where bf16 `tl.dot` gives wrong results (triton-lang/triton#11584)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreter_enabled())


def check_weight_2d(packed: torch.Tensor, state: QuantState) -> tuple[torch.Tensor, int, int]:
    """(packed as 1-D, N, K) of a 4-bit linear weight; raises when the kernels cannot read it."""
    packed = check_state(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"state.shape must be 2-D (out_features, in_features), got {tuple(state.shape)}")
    n, k = (int(s) for s in state.shape)
    if k % state.blocksize != 0:
        raise ValueError(f"in_features (state.shape[1] = {k}) must be a multiple of "
                         f"state.blocksize = {state.blocksize} so that no block spans two rows")
    return packed, n, k


def check_activation(x: torch.Tensor, name: str, packed: torch.Tensor, features: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"{name} must have dtype in {ACT_DTYPES}, got {x.dtype}")
    if x.device != packed.device:
        raise ValueError(f"{name} is on {x.device} but the weight is on {packed.device}")
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"{name} must have last dimension {features}, got shape {tuple(x.shape)}")


def check_bias(bias: torch.Tensor | None, x: torch.Tensor, n: int) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != (n,) or bias.device != x.device or bias.dtype != x.dtype:
        raise ValueError(f"bias must have shape ({n},), device {x.device} and dtype {x.dtype}; got "
                         f"shape {tuple(bias.shape)}, device {bias.device}, dtype {bias.dtype}")
    if not bias.is_contiguous():
        raise ValueError("bias must be contiguous")


def as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x as a (M, K) matrix with unit stride along K (no copy when x allows it)."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if x2.shape[0] > 0 and x2.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension, got strides "
                         f"{tuple(x.stride())}; call .contiguous() first")
    return x2


def _launch_gemv(x2, packed, state, bias, out, cfg: TileConfig) -> torch.Tensor:
    m, k = x2.shape
    n = out.shape[1]
    block_m = 1 if (m == 1 and cfg.block_m == 1) else 16  # the 1-row path serves M = 1 only
    block_k = cfg.block_k
    split_k = max(1, min(cfg.split_k, triton.cdiv(k, block_k)))
    dest = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=out.device)
    stride_os = 0 if split_k == 1 else dest.stride(0)
    grid = (triton.cdiv(n, cfg.block_n), split_k)
    _gemv_kernel[grid](x2, packed, state.code, *scale_args(state),
                       bias if bias is not None else out, dest,
                       m, n, k,
                       x2.stride(0), stride_os, dest.stride(-2),
                       BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize,
                       DOUBLE_QUANT=state.double_quant, HAS_BIAS=bias is not None,
                       DOT_FP32=dot_fp32(x2.dtype), BLOCK_M=block_m, BLOCK_N=cfg.block_n,
                       BLOCK_K=block_k, GROUPS=max(1, block_k // state.blocksize),
                       SPLIT_K=split_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split_k > 1:
        total = dest.sum(0)  # (M, N) float32
        if bias is not None:
            total += bias.float()
        out.copy_(total)
    return out


def _launch_gemm(x2, packed, state, bias, out, cfg: TileConfig) -> torch.Tensor:
    m, k = x2.shape
    n = out.shape[1]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _gemm_kernel[grid](x2, packed, state.code, *scale_args(state),
                       bias if bias is not None else out, out,
                       m, n, k,
                       x2.stride(0), out.stride(0),
                       BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize,
                       DOUBLE_QUANT=state.double_quant, HAS_BIAS=bias is not None,
                       DOT_FP32=dot_fp32(x2.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                       BLOCK_K=cfg.block_k, GROUPS=max(1, cfg.block_k // state.blocksize),
                       GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _bucket(m: int) -> int:
    """Rows rounded up to a power of two: the tuning cache key (one tuning per bucket)."""
    return 1 << max(0, (m - 1).bit_length())


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for a 4-bit weight W of shape (N, K), without materializing W.

    Args:
        x: (..., K) activations, float16, bfloat16 or float32, unit stride along K.
        packed: the weight's N * K / 2 packed uint8 codes, contiguous (any shape).
        state: the weight's `quant.QuantState`; K must be a multiple of `state.blocksize`.
        bias: optional (N,) tensor of x's dtype and device.

    Returns:
        (..., N) tensor of x's dtype, accumulated in float32. This is the no-grad launcher
        (the "cuda" kernel of `loralab::linear_4bit`): for autograd call
        `quant.linear_4bit` / `loralab_kernels.linear_4bit`, whose backward runs `matmul_4bit_grad_input`.
    """
    packed, n, k = check_weight_2d(packed, state)
    check_activation(x, "x", packed, k)
    check_bias(bias, x, n)
    x2 = as_rows(x, "x")  # (M, K)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)  # (M, N)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    bs = state.blocksize
    key = (_bucket(m), n, k, bs, state.double_quant, x.dtype, bias is not None)
    if m <= GEMV_MAX_M:
        launch = _launch_gemv
        cfg = pick_config("gemv", key, lambda c: launch(x2, packed, state, bias, out, c),
                          valid=lambda c: c.block_m == 16 or m == 1)
    else:
        launch = _launch_gemm
        cfg = pick_config("gemm", key, lambda c: launch(x2, packed, state, bias, out, c),
                          valid=lambda c: c.block_m <= max(64, _bucket(m)))
    launch(x2, packed, state, bias, out, cfg)
    return out.reshape(*x.shape[:-1], n)  # (..., N)
