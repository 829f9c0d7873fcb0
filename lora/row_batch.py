"""One adapter per batch row inside a LoRA layer: the row plan (one sort, segments), the
per-segment low-rank products on the CPU or the segmented Triton kernels on CUDA, and the
checks. The model-level API (`use_adapters`, `enable_adapter_names`) and the math are
described in `lora/mixed_batch.py`; this module imports only `lora/row_segments.py` (the
batched PyTorch path, which imports nothing from `lora`) and the reserved row name from
`lora/config.py`, so the layers can call it without an import cycle.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import RESERVED_NAME as BASE  # the row name that means "no adapter" (PEFT's name)
from .row_segments import ChunkLayout, SegmentedLoRAUpdate, add_update_, make_layout, stack_weights


@dataclass(frozen=True)
class RowPlan:
    """Where each adapter's tokens are in a flattened (tokens, features) input.

    `order` (M,) holds the token indices of all rows that use an adapter, grouped by
    adapter, on the input's device (`host_order`: the same on the host, for index math);
    `segments` lists `(name, start, end)` ranges of `order`. `contiguous` is True when
    `order` is `arange(M)` (rows already grouped, base rows only at the end), so slices
    replace the gather and scatter."""

    order: torch.Tensor
    host_order: np.ndarray = field(compare=False, repr=False)
    segments: tuple[tuple[str, int, int], ...]
    contiguous: bool
    _layouts: dict = field(default_factory=dict, compare=False, repr=False)

    def layout(self, names: list[str]) -> ChunkLayout:
        """The batched-matmul chunks (`lora/row_segments.py`) of the segments of `names` (the
        adapters a layer has, in segment order), cached: the layers of a model share them."""
        key = tuple(names)
        if key not in self._layouts:
            index = {n: i for i, n in enumerate(names)}
            segs = [(index[n], s, e) for n, s, e in self.segments if n in index and e > s]
            self._layouts[key] = make_layout(self.host_order, segs, self.contiguous, self.order.device)
        return self._layouts[key]


@dataclass
class RowAdapters:
    """The adapter of every row of the current batch, and the plans computed from it."""

    names: tuple[str, ...]
    _plans: dict = field(default_factory=dict, repr=False)

    def plan(self, tokens: int, device: torch.device) -> RowPlan:
        """The `RowPlan` of a flattened input of `tokens` tokens (cached: every layer of one
        forward pass sees the same shape)."""
        key = (tokens, device)
        if key not in self._plans:
            self._plans[key] = _make_plan(self.names, tokens, device)
        return self._plans[key]


def _make_plan(names: tuple[str, ...], tokens: int, device: torch.device) -> RowPlan:
    rows = len(names)
    per_row = tokens // rows
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name != BASE:
            groups.setdefault(name, []).append(i)
    segments, index_rows, start = [], [], 0
    for name, idx in groups.items():
        segments.append((name, start, start + len(idx) * per_row))
        index_rows.extend(idx)
        start += len(idx) * per_row
    row_index = np.asarray(index_rows, dtype=np.int64)  # (rows_with_adapter,)
    order = (row_index[:, None] * per_row + np.arange(per_row)).reshape(-1)  # (M,)
    contiguous = index_rows == list(range(len(index_rows)))  # grouped already, base rows (if any) last
    return RowPlan(torch.from_numpy(order).to(device), order, tuple(segments), contiguous)


def check_row_names(adapter_names, known: set[str] | list[str]) -> tuple[str, ...]:
    """`adapter_names` as a tuple: a non-empty list/tuple of str, each a known adapter or
    `"__base__"`; ValueError/TypeError naming `adapter_names` otherwise."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list with one adapter name (str) per row of the batch, "
                        f"got {type(adapter_names).__name__}")
    if not adapter_names:
        raise ValueError("adapter_names must name one adapter (or '__base__') per row, got an empty list")
    for n in adapter_names:
        if not isinstance(n, str):
            raise TypeError(f"adapter_names must hold str, got {type(n).__name__} ({n!r})")
    unknown = sorted({n for n in adapter_names if n != BASE and n not in known})
    if unknown:
        raise ValueError(f"adapter_names: {unknown} not found; the model has {sorted(known)} "
                         f"(use {BASE!r} for rows that run the base model alone)")
    return tuple(adapter_names)


def check_layer(layer: nn.Module, names, label: str | None = None) -> None:
    """Raise ValueError if `layer` cannot run a mixed batch of `names`: a layer type without
    the mixed-batch path, merged adapters, or a variant adapter (DoRA) among them."""
    label = label or layer._label()
    # `row_path_forward` names the forward that has the per-row branch (LoRALinear's,
    # LoRAEmbedding's): a subclass that overrides forward does not inherit the path.
    if getattr(type(layer), "row_path_forward", None) is not type(layer).forward:
        raise ValueError(f"adapter_names: {label} is a {type(layer).__name__}, which has no mixed-batch path "
                         "(supported: LoRALinear, QLoRALinear, LoRAEmbedding)")
    if layer.merged_adapters:
        raise ValueError(f"adapter_names cannot be used while adapters {layer.merged_adapters} are merged "
                         f"into {label} (every row would get them); unmerge() first")
    variants = getattr(layer, "lora_variant", {})
    special = sorted({n for n in names if n in variants})
    if special:
        raise ValueError(f"adapter_names: adapters {special} of {label} are DoRA (or another variant), which a "
                         "mixed batch does not support (DoRA rescales the whole base output per adapter); "
                         "run them batch by batch")


def _rows_of(x: torch.Tensor, rows: int, ids: bool) -> int:
    """The number of tokens in `x` (features last unless `ids`), checked against `rows`:
    batch-first inputs need `rows` leading rows; a flat (tokens[, features]) input needs a
    token count that is a multiple of `rows` (row-major)."""
    tokens = x.numel() if ids else x.numel() // x.shape[-1]
    batch_first = x.dim() >= (2 if ids else 3)
    ok = x.shape[0] == rows if batch_first else (tokens > 0 and tokens % rows == 0)
    if not ok:
        raise ValueError(f"adapter_names has {rows} entries but the layer input has shape {tuple(x.shape)}: "
                         "its leading dimension (batch rows), or for a (tokens, features) input its token "
                         "count (a multiple of the rows, row-major), must match")
    return tokens


def _segment_delta(layer, name: str, seg: torch.Tensor) -> torch.Tensor:
    """`scaling * B A dropout(seg)` (n_i, out) of one adapter's tokens: its low-rank product once."""
    A, B = layer.lora_A[name], layer.lora_B[name]
    h = A(layer.lora_dropout[name](seg.to(A.weight.dtype))) * layer.scaling[name]  # (n_i, r)
    return B(h)  # (n_i, out)


def add_segments(layer, plan: RowPlan, x2d: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result` (N, out) plus every segment's delta at its tokens' rows; the PyTorch path.

    `lora/row_segments.py` when the adapters are plain `nn.Linear` pairs of one float dtype
    with no active dropout: two batched matmuls over cached weight stacks for inference, one
    autograd.Function for training; otherwise one segment at a time through the adapters'
    modules (`_loop_segments`)."""
    present = [(n, s, e) for n, s, e in plan.segments if n in layer.r and e > s]  # others: base on this layer
    if not present:
        return result
    names = [n for n, _, _ in present]
    if not _batched_ok(layer, names, x2d):
        return _loop_segments(layer, plan, x2d, result)
    layout = plan.layout(names)
    weights = [layer.lora_A[n].weight for n in names] + [layer.lora_B[n].weight for n in names]
    dtype = weights[0].dtype
    if x2d.dtype != dtype:
        x2d = x2d.to(dtype)
    in_place = layer._can_add_in_place(result)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x2d, result, *weights)):
        scalings = [layer.scaling[n] for n in names]
        return SegmentedLoRAUpdate.apply(x2d, result, layout, scalings, in_place, *weights)
    a_stack, b_stack, scalings = _stacks(layer, names, b_rows_last=False)
    return add_update_(layout, x2d, result if in_place else result.clone(), a_stack, b_stack, scalings)


def _batched_ok(layer, names: list[str], x2d: torch.Tensor) -> bool:
    """Whether `row_segments` computes what the adapters' modules would: plain bias-free
    `nn.Linear` A and B (no subclass or hook to skip) of one float dtype, no active dropout
    (one mask per adapter), no autocast (it would pick the matmuls' dtype) and not under
    the compiler (the plan's Python lists)."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x2d.device.type):
        return False
    dtypes = set()
    mods_a, mods_b, drops = layer.lora_A._modules, layer.lora_B._modules, layer.lora_dropout._modules
    for n in names:  # (the ModuleDicts' own dicts: this runs in every layer call)
        drop = drops[n]
        for m in (mods_a[n], mods_b[n]):
            if type(m) is not nn.Linear or m.bias is not None or m._forward_hooks or m._forward_pre_hooks:
                return False
            dtypes.add(m.weight.dtype)
        if not isinstance(drop, nn.Identity) and not (isinstance(drop, nn.Dropout) and (drop.p == 0 or not drop.training)):
            return False
    return len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def _loop_segments(layer, plan: RowPlan, x2d: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """One segment at a time through the adapters' own modules (dropout, hooks, autocast).

    When the base output may be updated in place (`_can_add_in_place`), each segment is
    gathered and added back on its own (small tensors, no (N, out) temporaries); otherwise the
    segments' deltas are concatenated and added with one out-of-place `index_add`."""
    present = [(n, s, e) for n, s, e in plan.segments if n in layer.r]  # others: base on this layer
    if layer._can_add_in_place(result):
        for name, start, end in present:
            if plan.contiguous:  # slices: views, no gather or scatter
                result[start:end].add_(_segment_delta(layer, name, x2d[start:end]).to(result.dtype))
            else:
                idx = plan.order[start:end]  # (n_i,) token rows
                result.index_add_(0, idx, _segment_delta(layer, name, x2d.index_select(0, idx)).to(result.dtype))
        return result
    xs = x2d if plan.contiguous else x2d.index_select(0, plan.order)  # (M, in), grouped by adapter
    parts = [_segment_delta(layer, n, xs[s:e]).to(result.dtype) if n in layer.r
             else result.new_zeros(e - s, result.shape[1]) for n, s, e in plan.segments]
    delta = torch.cat(parts) if len(parts) > 1 else parts[0]  # (M, out)
    if plan.contiguous:
        return torch.cat([result[: delta.shape[0]] + delta, result[delta.shape[0]:]])
    return result.index_add(0, plan.order, delta)


def _use_kernels(layer, x2d: torch.Tensor, result: torch.Tensor) -> bool:
    """The Triton segments run where `loralab_kernels.select_backend` picks Triton: CUDA tensors, or
    CPU tensors under the interpreter with the backend forced (`quant.force_backend("triton")`,
    how the tests reach them); not with active dropout (the kernels have none)."""
    if torch.compiler.is_compiling():
        return False
    if not x2d.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False  # CPU tensors reach the kernels only under the interpreter (checked first: cheap)
    if layer.training and any(getattr(d, "p", 0) > 0 for d in layer.lora_dropout.values()):
        return False
    floats = (torch.float16, torch.bfloat16, torch.float32)
    dtypes = {layer.lora_A[n].weight.dtype for n in layer.r} | {layer.lora_B[n].weight.dtype for n in layer.r}
    if result.dtype not in floats or len(dtypes) != 1 or not dtypes <= set(floats) or result.stride(-1) != 1:
        return False
    from loralab_kernels import select_backend, triton_available

    return triton_available() and select_backend(x2d) == "triton"


_STACKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # layer -> (key, A, B, weights, scalings)


def _kernel_stacks(layer, names: list[str]):
    """The layer's A and B of `names`, stacked and zero-padded to the largest rank (kernels'
    layout) with their float32 scalings; differentiable stacks built each call when a weight
    needs a gradient, else `_stacks`' cached ones. (`_use_kernels` admits one weight dtype.)"""
    params = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in names]
    if torch.is_grad_enabled() and any(p.requires_grad for pair in params for p in pair):
        # training: differentiable stacks (gradients flow back to each A and B), built each call
        s = torch.tensor([layer.scaling[n] for n in names], dtype=torch.float32, device=params[0][0].device)
        return stack_weights([p[0] for p in params], 0), stack_weights([p[1] for p in params], 1), s
    return _stacks(layer, names)


def _stacks(layer, names: list[str], b_rows_last: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's A (L, R, in) and B (L, out, R) of `names`, detached, zero-padded to the
    largest rank, and their scalings (L,) (float64 for float64 weights, else float32: s is
    not rounded to low-precision weights); cached until a weight or a scaling changes
    (in-place writes bump `_version`, e.g. an optimizer step or hot swap; `.data =` changes
    the `data_ptr`; a replaced Parameter is another object: the cache holds the weights it
    was built from and compares identity, as a freed tensor's address and version can come
    back). `b_rows_last=False` stores B's memory as (L, R, out), the faster operand of the
    CPU expand `h @ B^T`; the kernels need the default (stride 1 along R)."""
    params = tuple((layer.lora_A[n].weight, layer.lora_B[n].weight) for n in names)
    scalings = tuple(layer.scaling[n] for n in names)
    key = (tuple(names), scalings,
           tuple((a.data_ptr(), a._version, b.data_ptr(), b._version) for a, b in params), b_rows_last)
    cached = _STACKS.get(layer)
    if cached is None or cached[0] != key or any(p is not q for pair, old in zip(params, cached[3], strict=True)
                                                 for p, q in zip(pair, old, strict=True)):
        a = stack_weights([p[0].detach() for p in params], 0)  # (L, R, in)
        b = stack_weights([p[1].detach() for p in params], 1)  # (L, out, R)
        if not b_rows_last:
            b = b.transpose(1, 2).contiguous().transpose(1, 2)  # (L, out, R) with (L, R, out) memory
        s = torch.tensor(scalings, device=a.device, dtype=torch.float64 if a.dtype == torch.float64 else torch.float32)
        cached = _STACKS[layer] = (key, a, b, params, s)
    return cached[1], cached[2], cached[4]


def _kernel_segments(layer, plan: RowPlan, x2d: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The Triton segments (loralab_kernels/segmented.py): one shrink and one expand launch for all
    adapters; adapters this layer lacks are skipped (-1)."""
    from loralab_kernels.segmented import lora_segments

    names = [n for n, _, _ in plan.segments if n in layer.r]
    if not names:
        return result
    index = {n: i for i, n in enumerate(names)}
    a, b, s = _kernel_stacks(layer, names)
    bounds = [0] + [e for _, _, e in plan.segments]
    seg_lora = [index.get(n, -1) for n, _, _ in plan.segments]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x2d, result, a, b))
    if not grad and not layer._can_add_in_place(result):
        result = result.clone()  # the kernels add in place (with autograd SegmentedLoRA copies itself)
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    return lora_segments(x2d, result, plan.order, bounds, seg_lora, a, b, s)


def linear_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`LoRALinear.forward` for a mixed batch (the layer hands over when `row_adapters` is set
    or the call carries `adapter_names=`). Shapes: x (..., in) -> (..., out)."""
    rows = _row_adapters(layer, kwargs)
    if rows is None:  # `adapter_names=None` outside a block: the layer's usual forward
        return type(layer).forward(layer, x, *args, **kwargs)
    if layer.disabled:  # adapters disabled: every row runs the base (as PEFT)
        return layer.base_layer(x, *args, **kwargs)
    check_layer(layer, rows.names)
    tokens = _rows_of(x, len(rows.names), ids=False)
    x2d = x.reshape(-1, x.shape[-1])  # (N, in)
    result = layer.base_layer(x2d, *args, **kwargs)  # (N, out): the base matmul once for all rows
    plan = rows.plan(tokens, x.device)
    if plan.segments:
        if _use_kernels(layer, x2d, result):
            result = _kernel_segments(layer, plan, x2d, result)
        else:
            result = add_segments(layer, plan, x2d, result)
    return result.view(*x.shape[:-1], result.shape[-1])  # (..., out)


def embedding_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """`LoRAEmbedding.forward` for a mixed batch: ids (...) -> (..., embedding_dim)."""
    rows = layer.row_adapters
    result = layer.base_layer(x)  # (..., d)
    if layer.disabled:
        return result
    check_layer(layer, rows.names)
    tokens = _rows_of(x, len(rows.names), ids=True)
    plan = rows.plan(tokens, x.device)
    if not plan.segments:
        return result
    ids = x.reshape(-1) if plan.contiguous else x.reshape(-1).index_select(0, plan.order)  # (M,)
    base, parts = layer.base_layer, []
    for name, start, end in plan.segments:
        if name not in layer.r:
            parts.append(result.new_zeros(end - start, layer.embedding_dim))
            continue
        A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        h = F.embedding(ids[start:end], A.T, base.padding_idx, base.max_norm, base.norm_type,
                        base.scale_grad_by_freq, base.sparse)  # (n_i, r)
        parts.append((h * layer.scaling[name]) @ B.T)  # (n_i, d)
    delta = torch.cat([p.to(result.dtype) for p in parts])
    flat = result.reshape(-1, result.shape[-1])  # (N, d)
    flat = flat.index_add(0, plan.order, delta)
    return flat.view(result.shape)


def _row_adapters(layer, kwargs: dict) -> RowAdapters | None:
    """The rows' adapters: `adapter_names=` passed to this call (popped), else the context's."""
    if "adapter_names" in kwargs:
        names = kwargs.pop("adapter_names")
        if names is None:
            return layer.row_adapters
        known = set(layer.r)
        return RowAdapters(check_row_names(names, known))
    return layer.row_adapters
