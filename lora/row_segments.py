"""The PyTorch path of a mixed batch's LoRA update: few ops whatever the number of adapters.

A loop over the adapters through their modules (a gather, two small matmuls, a scale and a
scatter per adapter, each an autograd node, PEFT's way) costs more than the low-rank products
themselves on a CPU: 64 tokens over 16 adapters are 16 pairs of 4-row matmuls. Two paths:

- inference (`add_update_`): the tokens grouped by adapter (a `RowPlan`) are cut into `C`
  chunks of at most `c` tokens, each padded with zero rows to `c`, so the shrink and the expand
  each run as one `torch.bmm` over the chunks against the adapters' stacked weights (cached by
  the caller). With `c = ceil(M / L)` for M tokens over L adapters there are at most 2L chunks
  and 2M padded rows (a long segment is split, a short one padded). Adapters of different
  ranks are zero-padded to the largest rank R (zero rows of A, zero columns of B add nothing).
- training (`SegmentedLoRAUpdate`): one autograd node for all adapters; forward and backward
  loop over the adapters' segments with plain matmuls on the weights themselves (stacking
  them would copy every weight twice a step: at 64 adapters of d = 4096 that is more memory
  traffic than the matmuls).

For a segment (or chunk) with adapter l, scaling s and token rows t:

    forward:   h = s * x[t] A_l^T             (n, r)
               y[t] += h B_l^T                (n, out)
    backward:  g = dL/dy[t]                   (n, out)
               dL/dB_l = g^T h                (out, r)
               dh = s * g B_l                 (n, r)
               dL/dA_l = dh^T x[t]            (r, in)
               dL/dx[t] = dh A_l              (n, in)

This module imports nothing from `lora` (the layers call it through `lora/row_batch.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ChunkLayout:
    """Where each padded slot of the (C, c) chunks reads its token, and where real slots go.

    `slots` (C * c,) holds the token row of every slot (padding: row 0, zeroed after the
    gather); `real` (M,) the positions of the real slots (None: no padding); `targets` (M,)
    their token rows; `lora` (C,) the adapter (stack index) of each chunk, None when chunk k
    is adapter k; `pad` (P,) the padding slots (None: none). `contiguous`: the slots are
    rows 0..M-1 in order, so slices replace the gather and the scatter. `bounds` (L + 1,):
    adapter l's tokens are `targets[bounds[l]:bounds[l + 1]]`; `in_order`: targets are 0..M-1."""

    slots: torch.Tensor
    real: torch.Tensor | None
    targets: torch.Tensor
    lora: torch.Tensor | None
    pad: torch.Tensor | None
    chunks: int
    size: int
    contiguous: bool
    bounds: tuple[int, ...]
    in_order: bool

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(N, f) -> (M, f): the tokens' rows grouped by adapter (a view when in order)."""
        return t[: self.bounds[-1]] if self.in_order else t.index_select(0, self.targets)

    def scatter_rows_(self, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """y (N, f) += d (M, f) at the tokens' rows; in place."""
        if self.in_order:
            y[: d.shape[0]].add_(d)
            return y
        return y.index_add_(0, self.targets, d)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(N, f) -> (C, c, f): the slots' rows, padding rows zero (never a view of `t`'s storage
        when padding exists)."""
        if self.contiguous:
            out = t[: self.targets.numel()]  # rows 0..M-1: a view
        else:
            out = t.index_select(0, self.slots)  # (C * c, f)
            if self.pad is not None:
                out.index_fill_(0, self.pad, 0)  # fill, not multiply: inf/nan rows become 0 too
        return out.reshape(self.chunks, self.size, t.shape[1])  # a copy only for a strided view

    def scatter_add_(self, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """y (N, f) += each real slot's row of d (C, c, f) at its token; in place."""
        d = d.reshape(-1, d.shape[-1])  # (C * c, f)
        if self.real is not None:
            d = d.index_select(0, self.real)  # (M, f): padding dropped
        if self.contiguous:
            y[: d.shape[0]].add_(d)
        else:
            y.index_add_(0, self.targets, d)
        return y

    def per_chunk(self, stack: torch.Tensor) -> torch.Tensor:
        """(L, ...) per-adapter tensor -> (C, ...) one per chunk."""
        return stack if self.lora is None else stack.index_select(0, self.lora)


def make_layout(order: np.ndarray, segments: list[tuple[int, int, int]], contiguous: bool,
                device: torch.device) -> ChunkLayout:
    """The chunks of `segments` ((stack index, start, end) ranges of `order`, the host copy of
    the plan's token order; non-empty, stack indices 0..L-1 in order) with `c = ceil(M / L)`
    tokens per chunk. The index math runs in NumPy: a layer call after a large matmul pays
    ~10 us per small torch op (its dispatcher state is out of cache), ~1 us per NumPy op."""
    total = sum(e - s for _, s, e in segments)
    size = -(-total // len(segments))  # c
    starts, lengths, lora = [], [], []
    for index, start, end in segments:
        for a in range(start, end, size):
            starts.append(a)
            lengths.append(min(size, end - a))
            lora.append(index)
    chunks = len(starts)
    offs = np.arange(size)
    pos = np.asarray(starts)[:, None] + offs  # (C, c) positions in `order`
    mask = (offs < np.asarray(lengths)[:, None]).reshape(-1)  # (C * c,) real slots
    slots = np.where(mask, order[np.minimum(pos.reshape(-1), order.size - 1)], 0)
    padded = not mask.all()
    real = np.flatnonzero(mask) if padded else None
    targets = slots if real is None else slots[real]
    in_order = contiguous and np.array_equal(targets, np.arange(total))
    bounds = [0]
    for _, start, end in segments:
        bounds.append(bounds[-1] + end - start)

    def on_device(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    one_each = lora == list(range(len(segments)))
    return ChunkLayout(on_device(slots), on_device(real), on_device(targets),
                       None if one_each else on_device(np.asarray(lora)),
                       on_device(np.flatnonzero(~mask)) if padded else None, chunks, size,
                       in_order and not padded, tuple(bounds), in_order)


def add_update_(layout: ChunkLayout, x: torch.Tensor, y: torch.Tensor, a_stack: torch.Tensor,
                b_stack: torch.Tensor, scalings: torch.Tensor) -> torch.Tensor:
    """y (N, out) += every chunk's `s B A x` in place, without autograd (inference): two bmm.

    a_stack (L, R, in), b_stack (L, out, R) (`stack_weights`), scalings (L,) tensor."""
    xs = layout.gather(x)  # (C, c, in), padding rows zero
    h = torch.bmm(xs, layout.per_chunk(a_stack).transpose(1, 2))  # (C, c, R)
    h.mul_(layout.per_chunk(scalings).view(-1, 1, 1))
    d = torch.bmm(h, layout.per_chunk(b_stack).transpose(1, 2))  # (C, c, out)
    return layout.scatter_add_(y, d if d.dtype == y.dtype else d.to(y.dtype))


def stack_weights(weights, rank_dim: int) -> torch.Tensor:
    """A (r_l, in) or B (out, r_l) of each adapter as (L, R, in) / (L, out, R), zero-padded."""
    r = max(w.shape[rank_dim] for w in weights)
    if all(w.shape[rank_dim] == r for w in weights):
        return torch.stack(weights)
    shape = (len(weights), r, weights[0].shape[1]) if rank_dim == 0 else (len(weights), weights[0].shape[0], r)
    out = weights[0].new_zeros(shape)
    for i, w in enumerate(weights):
        out[i].narrow(rank_dim, 0, w.shape[rank_dim]).copy_(w)
    return out


class SegmentedLoRAUpdate(torch.autograd.Function):
    """`y = result + (per segment) s_l x[t] A_l^T B_l^T` with gradients for x, result and every
    adapter's A and B (the module docstring has the math): one autograd node, two matmuls
    per adapter forward and four backward, on the weights themselves.

    Inputs: x (N, in), result (N, out), layout, scalings (L floats), in_place (bool: `result`
    may be updated in place, marked dirty), then the L A weights (r_l, in) and the L B
    weights (out, r_l), in the layout's adapter order."""

    @staticmethod
    def forward(ctx, x, result, layout: ChunkLayout, scalings, in_place: bool, *weights):
        adapters, b = len(scalings), layout.bounds
        xs = layout.gather_rows(x)  # (M, in), grouped by adapter
        d = xs.new_empty(xs.shape[0], result.shape[1])  # (M, out)
        hs = []
        for l, (A, B) in enumerate(zip(weights[:adapters], weights[adapters:], strict=True)):
            h = torch.mm(xs[b[l]:b[l + 1]], A.t()).mul_(scalings[l])  # (n_l, r_l)
            torch.mm(h, B.t(), out=d[b[l]:b[l + 1]])
            hs.append(h)
        y = result if in_place else result.clone()
        if in_place:
            ctx.mark_dirty(y)
        layout.scatter_rows_(y, d.to(y.dtype))
        ctx.save_for_backward(xs, *weights, *hs)
        ctx.layout, ctx.scalings, ctx.x_shape = layout, scalings, x.shape
        return y

    @staticmethod
    def backward(ctx, gy):
        layout, scalings, b = ctx.layout, ctx.scalings, ctx.layout.bounds
        adapters = len(scalings)
        xs, *rest = ctx.saved_tensors
        As, Bs, hs = rest[:adapters], rest[adapters:2 * adapters], rest[2 * adapters:]
        g = layout.gather_rows(gy).to(xs.dtype)  # (M, out)
        dxs = xs.new_empty(xs.shape) if ctx.needs_input_grad[0] else None  # (M, in)
        grads_a, grads_b = [], []
        for l in range(adapters):
            gl, xl = g[b[l]:b[l + 1]], xs[b[l]:b[l + 1]]
            grads_b.append(gl.t() @ hs[l])  # (out, r_l)
            dh = torch.mm(gl, Bs[l]).mul_(scalings[l])  # (n_l, r_l)
            grads_a.append(dh.t() @ xl)  # (r_l, in)
            if dxs is not None:
                torch.mm(dh, As[l], out=dxs[b[l]:b[l + 1]])
        dx = None if dxs is None else layout.scatter_rows_(dxs.new_zeros(ctx.x_shape), dxs)
        return (dx, gy, None, None, None, *grads_a, *grads_b)
