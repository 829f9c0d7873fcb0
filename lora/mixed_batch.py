"""Mixed-adapter batches: every row of a batch uses its own adapter, or `"__base__"` for none.

One frozen base serving many tasks at once (LoRA sec. 4.2; Punica, S-LoRA). For a batch
whose row i names adapter `a_i`, a LoRA layer computes

    h_i = W x_i + b + scaling[a_i] * B[a_i] A[a_i] x_i        (nothing added for "__base__")

The base matmul runs once for the whole batch. The rows are grouped by adapter with one
sort (a `RowPlan`, computed once per batch shape and shared by every layer); each
adapter's segment goes through its low-rank product once, and the deltas are added back
into the base output with one scatter (`index_add`). There is no per-row Python loop, and
gradients reach each adapter's A and B through its segment. On CUDA, for inference, the
segments run as the Triton kernels of `loralab_kernels.segmented` (shrink and expand, Punica's
SGMV/BGMV; one launch each for all adapters), with their backward in PyTorch.

Public API:

    with use_adapters(model, ["math", "__base__", "code", "math"]):
        logits = model(input_ids).logits          # rows 0..3 use their own adapter
        out = model.generate(input_ids, ...)      # also through generate()'s loop

    handle = enable_adapter_names(model)          # PEFT's keyword: model(x, adapter_names=[...])

Rows are the leading dimension of the layer input: a (rows, seq, features) input gives every
row's `seq` tokens its adapter; a (tokens, features) input has `tokens` a multiple of the
number of rows, row-major (row i's tokens contiguous, the layout of `x.reshape(-1, d)` of a
batch-first tensor). So a generate() loop, where the rows stay and the sequence grows, works
at every step. Merged adapters and DoRA adapters are refused (as PEFT does): a merged
weight would give its adapter to every row, and DoRA rescales the whole base output.
"""
from __future__ import annotations

import contextlib

from torch import nn

from .row_batch import BASE, RowAdapters, check_layer, check_row_names

__all__ = ["BASE", "use_adapters", "enable_adapter_names"]


# ----- model-level API -----
def _layers(model: nn.Module):
    from .inject import lora_layers

    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers; apply_lora() or load_adapter() first")
    return layers


def _set_rows(layers, rows: RowAdapters | None) -> None:
    for _, layer in layers:
        layer.row_adapters = rows


@contextlib.contextmanager
def use_adapters(model: nn.Module, adapter_names):
    """Inside the block every LoRA layer of `model` runs row i of each batch with adapter
    `adapter_names[i]` (`"__base__"`: no adapter). Works through models that swallow
    keyword arguments and through `generate()` (the batch rows stay, the sequence grows).

    Everything is checked before any layer changes: unknown names, a merged layer or a DoRA
    adapter raise ValueError naming `adapter_names`. Blocks do not nest."""
    layers = _layers(model)
    known = set().union(*(layer.r for _, layer in layers))
    names = check_row_names(adapter_names, known)
    from .extra_modules import (
        check_mixed_batch,  # saved-module copies and token rows have no per-row path
    )
    check_mixed_batch(model, names)
    for path, layer in layers:
        check_layer(layer, names, path)
        if layer.row_adapters is not None:
            raise ValueError(f"adapter_names: {path} already runs a mixed batch (use_adapters blocks do not nest)")
    rows = RowAdapters(names)
    _set_rows(layers, rows)
    try:
        yield model
    finally:
        _set_rows(layers, None)


def enable_adapter_names(model: nn.Module):
    """Accept PEFT's keyword on `model`'s own forward: `model(x, adapter_names=[...])` runs a
    mixed batch for that call (through any submodules, whether or not they forward keyword
    arguments). Returns a handle whose `remove()` undoes it."""
    _layers(model)  # a model without LoRA layers fails here, not at its first call
    state = {}

    def pre_hook(module, args, kwargs):
        names = kwargs.pop("adapter_names", None)
        if names is not None:
            state["block"] = use_adapters(model, names)
            state["block"].__enter__()
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        block = state.pop("block", None)
        if block is not None:
            block.__exit__(None, None, None)
        return output

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True),
               model.register_forward_hook(post_hook, with_kwargs=True, always_call=True)]
    return _Handles(handles)


class _Handles:
    def __init__(self, handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
