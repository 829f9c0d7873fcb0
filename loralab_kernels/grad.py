"""`matmul_4bit_grad_input(grad_y, packed, state)` = `grad_y @ dequantize(W)`: the input
gradient of `y = x @ W.T`, through W's transposed access pattern.

Each program owns a (BLOCK_M, BLOCK_K) tile of the result and walks N: it reads the
(BLOCK_N, BLOCK_K) weight tile that the forward kernel reads, and multiplies it
untransposed. BLOCK_K spans whole quantization blocks or a part of one, so each weight
row in the tile needs `GROUPS` scales.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.state import QuantState

from ._format import (
    dot_acc,
    grouped_tile,
    load_weight_codes,
    load_weight_scales,
    scale_args,
    scale_codes,
)
from .matmul import _bucket, as_rows, check_activation, check_weight_2d, dot_fp32
from .tuning import TileConfig, pick_config


@triton.jit(do_not_specialize=["M"])  # one compile for every row count
def _grad_input_kernel(gy_ptr, packed_ptr, code_ptr, absmax_ptr, nested_code_ptr,
                       nested_absmax_ptr, offset_ptr, out_ptr,
                       M, N, K,
                       stride_gm, stride_om,
                       BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                       DOUBLE_QUANT: tl.constexpr, DOT_FP32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUPS: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = grouped_tile(pid, num_m, num_k, GROUP_M)  # row tiles share each W tile in L2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_nn = tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    gy_rows = gy_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + offs_nn
        gy = tl.load(gy_rows + offs_n[None, :],
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)  # (BLOCK_M, BLOCK_N)
        codes = load_weight_codes(packed_ptr, code_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K)
        scales = load_weight_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                                    offs_n, k0, N, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT,
                                    GROUPS)
        w = scale_codes(codes, scales, BLOCK_N, BLOCK_K, GROUPS).to(gy.dtype)  # (BLOCK_N, BLOCK_K)
        acc = dot_acc(gy, w, acc, DOT_FP32)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(gy2, packed, state, out, cfg: TileConfig) -> torch.Tensor:
    m, n = gy2.shape
    k = out.shape[1]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(k, cfg.block_k),)
    _grad_input_kernel[grid](gy2, packed, state.code, *scale_args(state), out,
                             m, n, k,
                             gy2.stride(0), out.stride(0),
                             BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize,
                             DOUBLE_QUANT=state.double_quant, DOT_FP32=dot_fp32(gy2.dtype),
                             BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                             GROUPS=max(1, cfg.block_k // state.blocksize), GROUP_M=cfg.group_m,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def matmul_4bit_grad_input(grad_y: torch.Tensor, packed: torch.Tensor,
                          state: QuantState) -> torch.Tensor:
    """`grad_y @ W` for a 4-bit weight W of shape (N, K): the gradient of `x @ W.T` w.r.t. x.

    Args:
        grad_y: (..., N) float16, bfloat16 or float32, unit stride along N.
        packed, state: the weight, as for `matmul_4bit`.

    Returns:
        (..., K) tensor of grad_y's dtype, accumulated in float32.
    """
    packed, n, k = check_weight_2d(packed, state)
    check_activation(grad_y, "grad_y", packed, n)
    gy2 = as_rows(grad_y, "grad_y")  # (M, N)
    m = gy2.shape[0]
    out = torch.empty((m, k), dtype=grad_y.dtype, device=grad_y.device)  # (M, K)
    if m == 0:
        return out.reshape(*grad_y.shape[:-1], k)
    if n == 0:
        return out.zero_().reshape(*grad_y.shape[:-1], k)
    key = (_bucket(m), n, k, state.blocksize, state.double_quant, grad_y.dtype)
    cfg = pick_config("grad_input", key, lambda c: _launch(gy2, packed, state, out, c),
                      valid=lambda c: c.block_m <= max(64, _bucket(m)))
    _launch(gy2, packed, state, out, cfg)
    return out.reshape(*grad_y.shape[:-1], k)  # (..., K)
