"""Segmented LoRA kernels: many adapters in one launch (Punica's SGMV and BGMV, Chen et al. 2023).

A mixed-adapter batch (lora/mixed_batch.py) lists the tokens that use an adapter in an
order grouped by adapter: `order` (M,) holds their row indices in x and y, and segment s
covers positions `seg_start[s] : seg_start[s + 1]` of `order`, all with adapter
`seg_lora[s]` (an index into the stacked weights; -1 skips the segment, e.g. `"__base__"`
rows). For each position i in segment s, with t = order[i] and l = seg_lora[s]:

    shrink:  h[i, :]  = scaling[l] * x[t, :] @ A[l].T          h (M, R) float32
    expand:  y[t, :] += h[i, :] @ B[l].T                       y updated in place

A (L, R, K) and B (L, N, R) stack the L adapters of the batch, each zero-padded to the
largest rank R, so adapters of different ranks share one launch (the zero rows of A and
columns of B add nothing). The segmented kernels tile each segment in BLOCK_M-row `tl.dot`
tiles (prefill: segments of many tokens); the *gather* variants give every position its own
adapter (`row_lora` (M,), no segments) and reduce on CUDA cores without `tl.dot`'s 16-row
minimum (decode: one token per row, few rows per adapter). Accumulation is in float32.

`SegmentedLoRA` is the autograd.Function: kernels forward, the backward in PyTorch one
segment at a time (its docstring has the math).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreter_enabled
from ._format import ACT_DTYPES, dot_acc

BLOCK_M = 16  # tokens per program of the segmented kernels (tl.dot's minimum)
GATHER_MAX_SEGMENT = 16  # below this many tokens per adapter the gather kernels run


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, scale_ptr, order_ptr, seg_start_ptr, seg_lora_ptr, h_ptr,
                   K, R,
                   stride_xm, stride_al, stride_ar, stride_hm,
                   DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    lora = tl.load(seg_lora_ptr + seg).to(tl.int64)
    end = start + (end - start) * (lora >= 0).to(tl.int32)  # -1: "__base__" rows, an empty segment
    lora = tl.maximum(lora, 0)  # keeps the masked-out weight addresses in bounds
    offs_m = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in `order`
    mask_m = offs_m < end  # programs past a short segment's end load and store nothing
    rows = tl.load(order_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)  # token rows of x
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + lora * stride_al + offs_r[:, None] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=(offs_r[:, None] < R) & mask_k[None, :],
                    other=0.0)  # (BLOCK_R, BLOCK_K)
        acc = dot_acc(x, tl.trans(a), acc, DOT_FP32)
    acc *= tl.load(scale_ptr + lora)
    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :], acc,
             mask=mask_m[:, None] & (offs_r[None, :] < R))


@triton.jit
def _expand_kernel(h_ptr, b_ptr, order_ptr, seg_start_ptr, seg_lora_ptr, y_ptr,
                   N, R,
                   stride_hm, stride_bl, stride_bn, stride_ym,
                   DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    lora = tl.load(seg_lora_ptr + seg).to(tl.int64)
    end = start + (end - start) * (lora >= 0).to(tl.int32)
    lora = tl.maximum(lora, 0)
    offs_m = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = tl.load(order_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :],
                mask=mask_m[:, None] & (offs_r[None, :] < R), other=0.0)  # (BLOCK_M, BLOCK_R) fp32
    b = tl.load(b_ptr + lora * stride_bl + offs_n[:, None] * stride_bn + offs_r[None, :],
                mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)  # (BLOCK_N, BLOCK_R)
    acc = dot_acc(h.to(b.dtype), tl.trans(b), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32)
    mask = mask_m[:, None] & (offs_n[None, :] < N)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]  # each token once: no race
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _shrink_gather_kernel(x_ptr, a_ptr, scale_ptr, order_ptr, row_lora_ptr, h_ptr,
                          K, R,
                          stride_xm, stride_al, stride_ar, stride_hm,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(order_ptr + i).to(tl.int64)
    lora = tl.load(row_lora_ptr + i).to(tl.int64)
    k_end = K * (lora >= 0).to(tl.int32)  # -1: a "__base__" row, nothing loaded (h = 0)
    lora = tl.maximum(lora, 0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < k_end
        x = tl.load(x_ptr + row * stride_xm + k0 + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + lora * stride_al + offs_r[:, None] * stride_ar + (k0 + offs_k)[None, :],
                    mask=(offs_r[:, None] < R) & mask_k[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)  # (BLOCK_R,)
    acc *= tl.load(scale_ptr + lora)
    tl.store(h_ptr + i * stride_hm + offs_r, acc, mask=offs_r < R)


@triton.jit
def _expand_gather_kernel(h_ptr, b_ptr, order_ptr, row_lora_ptr, y_ptr,
                          N, R,
                          stride_hm, stride_bl, stride_bn, stride_ym,
                          BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(order_ptr + i).to(tl.int64)
    lora = tl.load(row_lora_ptr + i).to(tl.int64)
    n_end = N * (lora >= 0).to(tl.int32)  # -1: a "__base__" row, y untouched
    lora = tl.maximum(lora, 0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    h = tl.load(h_ptr + i * stride_hm + offs_r, mask=offs_r < R, other=0.0)  # (BLOCK_R,) fp32
    b = tl.load(b_ptr + lora * stride_bl + offs_n[:, None] * stride_bn + offs_r[None, :],
                mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0).to(tl.float32)
    acc = tl.sum(b * h[None, :], axis=1)  # (BLOCK_N,)
    mask = offs_n < n_end
    y_ptrs = y_ptr + row * stride_ym + offs_n
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


# ----- launchers -----
def _dot_fp32(dtype: torch.dtype) -> bool:
    """float32 `tl.dot` at full precision for fp32, and for bf16 under the interpreter (whose
    bf16 `tl.dot` is broken, triton-lang/triton#11584)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreter_enabled())


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _check_index(t: torch.Tensor, name: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the activations on {device}")


def _check_stack(w: torch.Tensor, name: str, x: torch.Tensor, size: int, dim: int) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        raise ValueError(f"{name} must be a 3-D (adapters, ...) stack, got {getattr(w, 'shape', w)}")
    if w.dtype not in ACT_DTYPES or w.device != x.device or w.stride(-1) != 1:
        raise ValueError(f"{name} must be float16/bfloat16/float32 with unit last stride on {x.device}, "
                         f"got {w.dtype} on {w.device} with strides {tuple(w.stride())}")
    if w.shape[dim] != size:
        raise ValueError(f"{name} has shape {tuple(w.shape)}; dimension {dim} must be {size}")


def _check_x(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"{name} must be a 2-D float16/bfloat16/float32 tensor")
    if x.shape[0] and x.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension")


def _check_scalings(scalings, stack: torch.Tensor) -> None:
    if not isinstance(scalings, torch.Tensor) or scalings.dtype != torch.float32 \
            or scalings.shape != (stack.shape[0],) or scalings.device != stack.device:
        raise ValueError(f"scalings must be a float32 tensor of shape ({stack.shape[0]},) on {stack.device}")


def _check_segments(order, seg_start, seg_lora, max_segment, x, adapters: int) -> None:
    """Types, devices and sizes always; the values (bounds inside `order`, non-decreasing, the
    longest segment <= max_segment, adapter indices in [-1, adapters)) on CPU tensors only,
    where reading them costs no GPU synchronisation (lora.mixed_batch builds them correctly)."""
    for t, name in ((order, "order"), (seg_start, "seg_start"), (seg_lora, "seg_lora")):
        _check_index(t, name, x.device)
    if seg_start.numel() != seg_lora.numel() + 1:
        raise ValueError(f"seg_start must have one entry more than seg_lora, got {seg_start.numel()} "
                         f"and {seg_lora.numel()}")
    if isinstance(max_segment, bool) or not isinstance(max_segment, int) or max_segment < 0:
        raise ValueError(f"max_segment must be an int >= 0 (the longest segment), got {max_segment!r}")
    if x.device.type == "cpu" and seg_lora.numel():
        lengths = seg_start.diff()
        if int(seg_start[0]) < 0 or int(seg_start[-1]) > order.numel() or bool((lengths < 0).any()):
            raise ValueError(f"seg_start must be non-decreasing within [0, {order.numel()}] (order's length)")
        if int(lengths.max()) > max_segment:
            raise ValueError(f"max_segment {max_segment} is below the longest segment {int(lengths.max())}")
        if int(seg_lora.min()) < -1 or int(seg_lora.max()) >= adapters:
            raise ValueError(f"seg_lora must hold stack indices in [0, {adapters}) or -1")
    if x.device.type == "cpu" and order.numel() and (int(order.min()) < 0 or int(order.max()) >= x.shape[0]):
        raise ValueError(f"order must hold row indices in [0, {x.shape[0]})")


def _check_rows(order, row_lora, x, adapters: int) -> None:
    """The gather variants' indices: types and shapes always, values on CPU tensors (as above)."""
    _check_index(order, "order", x.device)
    _check_index(row_lora, "row_lora", x.device)
    if row_lora.shape != order.shape:
        raise ValueError(f"row_lora must have order's shape {tuple(order.shape)}, got {tuple(row_lora.shape)}")
    if x.device.type == "cpu" and order.numel():
        if int(order.min()) < 0 or int(order.max()) >= x.shape[0]:
            raise ValueError(f"order must hold row indices in [0, {x.shape[0]})")
        if int(row_lora.min()) < -1 or int(row_lora.max()) >= adapters:
            raise ValueError(f"row_lora must hold stack indices in [0, {adapters}) or -1")


def segmented_shrink(x, a_stack, scalings, order, seg_start, seg_lora, max_segment: int) -> torch.Tensor:
    """h (M, R) float32: `h[i] = scalings[l] * x[order[i]] @ a_stack[l].T` over each segment.

    x (T, K); a_stack (L, R, K) of x's dtype; scalings (L,) float32; order (M,);
    seg_start (S + 1,), seg_lora (S,); max_segment: the longest segment (sizes the grid).
    Positions of `order` outside every segment are left at zero."""
    _check_x(x, "x")
    _check_stack(a_stack, "a_stack", x, x.shape[1], 2)
    _check_segments(order, seg_start, seg_lora, max_segment, x, a_stack.shape[0])
    _check_scalings(scalings, a_stack)
    if a_stack.dtype != x.dtype:
        raise ValueError(f"a_stack must have x's dtype {x.dtype}, got {a_stack.dtype}")
    r = a_stack.shape[1]
    h = torch.zeros((order.numel(), r), dtype=torch.float32, device=x.device)
    if seg_lora.numel() == 0 or max_segment == 0:
        return h
    grid = (seg_lora.numel(), triton.cdiv(max_segment, BLOCK_M))
    _shrink_kernel[grid](x, a_stack, scalings, order, seg_start, seg_lora, h,
                         x.shape[1], r,
                         x.stride(0), a_stack.stride(0), a_stack.stride(1), h.stride(0),
                         DOT_FP32=_dot_fp32(x.dtype), BLOCK_M=BLOCK_M, BLOCK_R=_block_r(r), BLOCK_K=64)
    return h


def segmented_expand(h, b_stack, y, order, seg_start, seg_lora, max_segment: int) -> torch.Tensor:
    """`y[order[i]] += h[i] @ b_stack[l].T` over each segment, in place; returns y.

    h (M, R) float32; b_stack (L, N, R); y (T, N)."""
    _check_x(y, "y")
    _check_stack(b_stack, "b_stack", y, y.shape[1], 1)
    _check_segments(order, seg_start, seg_lora, max_segment, y, b_stack.shape[0])
    r = b_stack.shape[2]
    if h.dtype != torch.float32 or h.shape != (order.numel(), r):
        raise ValueError(f"h must be float32 of shape ({order.numel()}, {r}), got {h.dtype} {tuple(h.shape)}")
    if seg_lora.numel() == 0 or max_segment == 0:
        return y
    block_n = 64
    grid = (seg_lora.numel(), triton.cdiv(max_segment, BLOCK_M), triton.cdiv(y.shape[1], block_n))
    _expand_kernel[grid](h, b_stack, order, seg_start, seg_lora, y,
                         y.shape[1], r,
                         h.stride(0), b_stack.stride(0), b_stack.stride(1), y.stride(0),
                         DOT_FP32=_dot_fp32(b_stack.dtype), BLOCK_M=BLOCK_M, BLOCK_N=block_n,
                         BLOCK_R=_block_r(r))
    return y


def gather_shrink(x, a_stack, scalings, order, row_lora) -> torch.Tensor:
    """h (M, R) float32: `h[i] = scalings[l] * x[order[i]] @ a_stack[l].T` with l = row_lora[i]."""
    _check_x(x, "x")
    _check_stack(a_stack, "a_stack", x, x.shape[1], 2)
    _check_rows(order, row_lora, x, a_stack.shape[0])
    _check_scalings(scalings, a_stack)
    r = a_stack.shape[1]
    h = torch.empty((order.numel(), r), dtype=torch.float32, device=x.device)
    if order.numel():
        _shrink_gather_kernel[(order.numel(),)](x, a_stack, scalings, order, row_lora, h,
                                                x.shape[1], r,
                                                x.stride(0), a_stack.stride(0), a_stack.stride(1), h.stride(0),
                                                BLOCK_R=_block_r(r), BLOCK_K=128)
    return h


def gather_expand(h, b_stack, y, order, row_lora) -> torch.Tensor:
    """`y[order[i]] += h[i] @ b_stack[row_lora[i]].T`, in place; returns y."""
    _check_x(y, "y")
    _check_stack(b_stack, "b_stack", y, y.shape[1], 1)
    _check_rows(order, row_lora, y, b_stack.shape[0])
    r = b_stack.shape[2]
    if h.dtype != torch.float32 or h.shape != (order.numel(), r):
        raise ValueError(f"h must be float32 of shape ({order.numel()}, {r}), got {h.dtype} {tuple(h.shape)}")
    if order.numel():
        block_n = 128
        _expand_gather_kernel[(order.numel(), triton.cdiv(y.shape[1], block_n))](
            h, b_stack, order, row_lora, y,
            y.shape[1], r,
            h.stride(0), b_stack.stride(0), b_stack.stride(1), y.stride(0),
            BLOCK_N=block_n, BLOCK_R=_block_r(r))
    return y


# ----- the layer-level call -----
def _launch(x2d, y, order, bounds: list[int], seg_lora: list[int], a_stack, b_stack, scalings):
    """Shrink then expand into y in place; returns (y, h). The gather kernels when every
    segment is short (decode), the segmented `tl.dot` kernels otherwise (prefill)."""
    longest = max((bounds[i + 1] - bounds[i] for i in range(len(seg_lora))), default=0)
    if longest < GATHER_MAX_SEGMENT:
        row_lora = torch.repeat_interleave(torch.tensor(seg_lora, dtype=torch.int32),
                                           torch.tensor(bounds).diff()).to(order.device)
        h = gather_shrink(x2d, a_stack, scalings, order[: bounds[-1]], row_lora)
        return gather_expand(h, b_stack, y, order[: bounds[-1]], row_lora), h
    seg_start = torch.tensor(bounds, dtype=torch.int32).to(order.device)
    lora = torch.tensor(seg_lora, dtype=torch.int32).to(order.device)
    h = segmented_shrink(x2d, a_stack, scalings, order, seg_start, lora, longest)
    return segmented_expand(h, b_stack, y, order, seg_start, lora, longest), h


class SegmentedLoRA(torch.autograd.Function):
    """`y = result + (per segment) scaling_l * x[t] A_l^T B_l^T` with the kernels; backward in
    PyTorch, one segment at a time. For segment s with adapter l, rows t = order[s], incoming
    g = dL/dy[t] (n, N) and the saved h = scaling_l x[t] A_l^T (n, R):

        dL/dresult = dL/dy
        dL/dB_l   += g^T h                          (N, R)
        dh         = scaling_l * g B_l              (n, R)
        dL/dA_l   += dh^T x[t]                      (R, K)
        dL/dx[t]  += dh A_l                         (n, K)
    """

    @staticmethod
    def forward(ctx, x2d, result, a_stack, b_stack, scalings, order, bounds, seg_lora):
        y, h = _launch(x2d, result.clone(), order, bounds, seg_lora, a_stack, b_stack, scalings)
        ctx.save_for_backward(x2d, a_stack, b_stack, scalings, order, h)
        ctx.bounds, ctx.seg_lora = bounds, seg_lora
        return y

    @staticmethod
    def backward(ctx, gy):
        x2d, a_stack, b_stack, scalings, order, h = ctx.saved_tensors
        dx = torch.zeros_like(x2d, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        da = torch.zeros_like(a_stack, dtype=torch.float32)  # (L, R, K)
        db = torch.zeros_like(b_stack, dtype=torch.float32)  # (L, N, R)
        for s, lora in enumerate(ctx.seg_lora):
            start, end = ctx.bounds[s], ctx.bounds[s + 1]
            if lora < 0 or start == end:
                continue
            rows = order[start:end]  # (n,)
            g = gy.index_select(0, rows).float()  # (n, N)
            db[lora] += g.T @ h[start:end]
            dh = (g @ b_stack[lora].float()) * scalings[lora]  # (n, R)
            da[lora] += dh.T @ x2d.index_select(0, rows).float()
            if dx is not None:
                dx.index_add_(0, rows, dh @ a_stack[lora].float())
        return (None if dx is None else dx.to(x2d.dtype), gy, da.to(a_stack.dtype), db.to(b_stack.dtype),
                None, None, None, None)


def lora_segments(x2d, y, order, bounds: list[int], seg_lora: list[int], a_stack, b_stack,
                  scalings) -> torch.Tensor:
    """y (T, N) with each segment's `scaling * B A x` added: in place when nothing needs a
    gradient, else through `SegmentedLoRA` (a new tensor; gradients for x, y, the stacks).

    bounds: the S + 1 segment boundaries in `order`; seg_lora: S stack indices (-1: skip)."""
    x2d = x2d.to(a_stack.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x2d, y, a_stack, b_stack)):
        return SegmentedLoRA.apply(x2d, y, a_stack, b_stack, scalings, order, bounds, seg_lora)
    return _launch(x2d, y, order, bounds, seg_lora, a_stack, b_stack, scalings)[0]
