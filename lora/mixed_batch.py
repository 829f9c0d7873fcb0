"""Mixed-adapter batches: every row of a batch uses its own adapter, or `"__base__"` for none.

One frozen base serving many tasks at once (LoRA sec. 4.2; Punica, S-LoRA). For a batch
whose row i names adapter `a_i`, a LoRA layer computes

    h_i = W x_i + b + scaling[a_i] * B[a_i] A[a_i] x_i        (nothing added for "__base__")

The base matmul runs once for the whole batch. The rows are grouped by adapter with one
sort (a `RowPlan`, computed once per batch shape and shared by every layer). On the CPU, for
inference, the segments are cut into padded chunks and every adapter's low-rank product runs
in two batched matmuls, added back into the base output with one scatter (`index_add`); for
training, one autograd.Function covers all adapters, its forward and backward a few plain
matmuls per adapter segment (`lora/row_segments.py`). There is no per-row loop, and gradients
reach each adapter's A and B through its segment. On CUDA, for inference, the
segments run as the Triton kernels of `loralab_kernels.segmented` (shrink and expand, Punica's
SGMV/BGMV; one launch each for all adapters), with their backward in PyTorch.

Public API:

    with use_adapters(model, ["math", "__base__", "code", "math"]):
        logits = model(input_ids).logits          # rows 0..3 use their own adapter
        out = model.generate(input_ids, ...)      # also through generate()'s loop

    handle = enable_adapter_names(model)          # PEFT's keyword: model(x, adapter_names=[...])
    model.generate(input_ids, adapter_names=[...], num_beams=2)   # and on generate()
    handle.remove()

Rows are the leading dimension of the layer input: a (rows, seq, features) input gives every
row's `seq` tokens its adapter; a (tokens, features) input has `tokens` a multiple of the
number of rows, row-major (row i's tokens contiguous, the layout of `x.reshape(-1, d)` of a
batch-first tensor). So a generate() loop, where the rows stay and the sequence grows, works
at every step. Merged adapters and DoRA adapters are refused (as PEFT does): a merged
weight would give its adapter to every row, and DoRA rescales the whole base output.
"""
from __future__ import annotations

import contextlib
import functools

import torch
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
    arguments). If `model` has a `generate` method, `model.generate(..., adapter_names=[...])`
    works too (see `_wrap_generate`). Returns a handle whose `remove()` undoes both."""
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
    if callable(getattr(model, "generate", None)):
        handles.append(_wrap_generate(model))
    return _Handles(handles)


def _wrap_generate(model: nn.Module) -> "_GenerateWrapper":
    """Shadow `model.generate` with an instance attribute that pops `adapter_names` (before
    transformers validates the model keyword arguments, which would refuse it) and runs the
    call inside `use_adapters`.

    transformers repeats every prompt `max(num_beams, num_return_sequences)` times before
    decoding (`GenerationMixin._expand_inputs_for_generation`); each name is repeated as many
    times, so every beam and returned sequence keeps its prompt's adapter (PEFT repeats the
    names for `num_beams` only). Encoder-decoder models run the encoder on the unexpanded
    batch, so there an expanding call is refused."""
    wrapper = _GenerateWrapper(model)
    model.generate = wrapper
    return wrapper


class _GenerateWrapper:
    def __init__(self, model: nn.Module):
        self.model, self.inner = model, model.generate  # the bound method (or an earlier wrapper)
        self.had_attr = "generate" in model.__dict__
        functools.update_wrapper(self, self.inner)

    def __call__(self, *args, adapter_names=None, **kwargs):
        if adapter_names is None:
            return self.inner(*args, **kwargs)
        known = set().union(*(layer.r for _, layer in _layers(self.model)))
        names = list(check_row_names(adapter_names, known))
        batch = _batch_size(args, kwargs)
        if batch is not None and batch != len(names):
            raise ValueError(f"adapter_names has {len(names)} entries but generate() got {batch} prompts: "
                             "name one adapter (or '__base__') per prompt")
        expand = _expansion(self.model, args, kwargs)
        if expand > 1:
            if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
                raise ValueError("adapter_names with num_beams or num_return_sequences > 1 is not supported on "
                                 "encoder-decoder models (the encoder sees the prompts once, the decoder "
                                 f"{expand} times each); use use_adapters() around separate calls")
            names = [n for n in names for _ in range(expand)]  # as transformers repeats the prompts
        with use_adapters(self.model, names):
            return self.inner(*args, **kwargs)

    def remove(self) -> None:
        if self.model.__dict__.get("generate") is self:
            if self.had_attr:
                self.model.generate = self.inner
            else:
                del self.model.generate


def _batch_size(args, kwargs) -> int | None:
    """The number of prompts given to generate(): input_ids / inputs / inputs_embeds (a tensor,
    batch first) or a list of prompts (the in-repo Llama); None if not found."""
    for value in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs"),
                  kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
        if isinstance(value, (list, tuple)) and value:
            return len(value)
    return None


def _expansion(model: nn.Module, args, kwargs) -> int:
    """How many times transformers' generate() repeats each prompt: max(num_beams,
    num_return_sequences) from the keywords, else the `generation_config` passed, else the
    model's (1 for models without a `generation_config`)."""
    if not hasattr(model, "generation_config"):
        return 1
    config = kwargs.get("generation_config")
    if config is None:
        config = next((a for a in args if type(a).__name__ == "GenerationConfig"), model.generation_config)
    sizes = [kwargs.get(key, getattr(config, key, None)) for key in ("num_beams", "num_return_sequences")]
    return max([v for v in sizes if isinstance(v, int)] + [1])


class _Handles:
    def __init__(self, handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
