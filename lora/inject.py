"""Put LoRA layers into any `nn.Module`, take them out again, and count parameters.

`apply_lora` modifies the model in place (like PEFT's `inject_adapter_in_model`):
each targeted layer is replaced by its LoRA wrapper, chosen from `LORA_LAYER_TYPES`
(extend it with `register_lora_layer`).
"""
from __future__ import annotations

import copy
import inspect
import re
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from .config import ALL_LINEAR, BIAS_MODES, LoRAConfig, check_choice
from .dora import check_dora_targets
from .layer import LoRAEmbedding, LoRALayer, LoRALinear, _is_conv1d

# base layer type -> LoRA wrapper type; "linear-like" types are the ones "all-linear" picks.
LORA_LAYER_TYPES: dict[type, type] = {nn.Linear: LoRALinear, nn.Embedding: LoRAEmbedding}
LINEAR_LIKE_TYPES: set[type] = {nn.Linear}
CONFIG_ATTR = "lora_configs"  # model attribute: {adapter_name: LoRAConfig} of the adapters applied


def register_lora_layer(base_cls: type, wrapper_cls: type, linear_like: bool = True) -> None:
    """Let `apply_lora` wrap `base_cls` layers with `wrapper_cls` (which needs a
    `from_layer(base, r=, alpha=, dropout=, adapter_name=, rslora=, init=, fan_in_fan_out=, dtype=)`).
    `linear_like=True` makes "all-linear" include this type."""
    if not (isinstance(base_cls, type) and issubclass(base_cls, nn.Module)):
        raise TypeError(f"base_cls must be an nn.Module subclass, got {base_cls!r}")
    if not (isinstance(wrapper_cls, type) and issubclass(wrapper_cls, LoRALayer)):
        raise TypeError(f"wrapper_cls must be a LoRALayer subclass, got {wrapper_cls!r}")
    LORA_LAYER_TYPES[base_cls] = wrapper_cls
    if linear_like:
        LINEAR_LIKE_TYPES.add(base_cls)
    else:
        LINEAR_LIKE_TYPES.discard(base_cls)


def _wrapper_for(module: nn.Module) -> type | None:
    if _is_conv1d(module):
        return LoRALinear
    for cls in type(module).__mro__:
        if cls in LORA_LAYER_TYPES:
            return LORA_LAYER_TYPES[cls]
    return None


def _is_linear_like(module: nn.Module) -> bool:
    if isinstance(module, LoRALayer):
        return _is_linear_like(module.base_layer)
    return _is_conv1d(module) or any(cls in LINEAR_LIKE_TYPES for cls in type(module).__mro__)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """(qualified name, layer) for every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules that could be targeted: not the root, not inside a LoRA layer."""
    inside = [name for name, _ in lora_layers(model)]
    return [(name, m) for name, m in model.named_modules()
            if name and not any(name.startswith(p + ".") for p in inside)]


def _matches(patterns: list[str] | str | None, name: str) -> bool:
    """PEFT's rule: a string is a regex for the whole name; a list entry matches the name or a suffix."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s) that "all-linear" leaves out.

    PEFT's rule is `model.get_output_embeddings()` for transformers models; for any other
    module we take, in order: a module named `lm_head`; else a linear layer whose weight is
    the same tensor as an `nn.Embedding` weight (tied embeddings); else the last linear
    layer whose `out_features` equals an embedding's `num_embeddings` (the vocabulary).
    """
    modules = dict(_candidates(model))
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, nn.Module):
        return {n for n, m in modules.items() if m is head}
    named = {n for n in modules if n == "lm_head" or n.endswith(".lm_head")}
    if named:
        return named
    embeddings = [m for m in modules.values() if isinstance(m, nn.Embedding)]
    linears = [(n, m) for n, m in modules.items() if _is_linear_like(m)]
    emb_weights = {id(e.weight) for e in embeddings}
    tied = {n for n, m in linears if id(getattr(m, "weight", None)) in emb_weights}
    if tied:
        return tied
    vocab = {e.num_embeddings for e in embeddings}
    vocab_heads = [n for n, m in linears if getattr(m, "out_features", None) in vocab]
    return {vocab_heads[-1]} if vocab_heads else set()


def resolve_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Qualified names of the modules `config` targets, or ValueError listing the candidates."""
    candidates = _candidates(model)
    wrappable = [n for n, m in candidates if isinstance(m, LoRALayer) or _wrapper_for(m) is not None]
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        heads = output_head_names(model)
        names = [n for n, m in candidates if _is_linear_like(m) and n not in heads]
    else:
        names = [n for n, _ in candidates if _matches(config.target_modules, n)]
    names = [n for n in names if not _matches(config.exclude_modules, n)
             and not _matches(config.modules_to_save, n)]
    if not names:
        shown = ", ".join(wrappable[:60]) + (" ..." if len(wrappable) > 60 else "")
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of "
                         f"{type(model).__name__}; candidate module names: [{shown}]")
    modules = dict(candidates)
    bad = [f"{n} ({type(modules[n]).__name__})" for n in names
           if not isinstance(modules[n], LoRALayer) and _wrapper_for(modules[n]) is None]
    if bad:
        supported = sorted({c.__name__ for c in LORA_LAYER_TYPES} | {"Conv1D"})
        raise ValueError(f"target_modules={config.target_modules!r} matched modules LoRA cannot wrap: {bad}; "
                         f"supported types: {supported}")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze everything but the active adapters; `bias` = "all" also trains every bias,
    "lora_only" the biases of LoRA-wrapped layers (LoRA sec. 4.2 trains no biases)."""
    check_choice("bias", bias, BIAS_MODES)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.set_adapter(layer.active_adapters)
        if bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)


def modules_to_save_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    names = [n for n, _ in _candidates(model) if _matches(config.modules_to_save, n)]
    if config.modules_to_save and not names:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module; candidate module "
                         f"names: {[n for n, _ in _candidates(model)][:60]}")
    return names


def apply_lora(model: nn.Module, config: LoRAConfig, adapter_name: str = "default",
               dtype: torch.dtype | None = None) -> list[str]:
    """Wrap the targeted layers of `model` (in place) with LoRA and freeze the rest.

    Args:
        model: any nn.Module.
        config: where and how big (see `LoRAConfig`).
        adapter_name: name of this adapter; a second `apply_lora` with another name adds
            a second (inactive) adapter to layers already wrapped.
        dtype: adapter dtype (default float32; float64 for float64 bases).

    Returns:
        The qualified names of the wrapped modules.

    Modules in `config.modules_to_save` are trained in full, in place (shared by all
    adapters, unlike PEFT's copies).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    configs = getattr(model, CONFIG_ATTR, None) or {}
    if adapter_name in configs:
        raise ValueError(f"adapter_name {adapter_name!r} is already applied to this model; "
                         "LoRA cannot be applied twice with the same name (use another adapter_name)")
    names = resolve_targets(model, config)
    save_names = modules_to_save_names(model, config)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALayer) and adapter_name in module.r:
            raise ValueError(f"{name} already has adapter {adapter_name!r}; LoRA cannot be applied twice")
    if config.dora:
        check_dora_targets(model, names)
    for name in names:
        module = model.get_submodule(name)
        r, alpha = config.rank_and_alpha(name)
        kwargs = dict(adapter_name=adapter_name, rslora=config.rslora, init=config.init, dtype=dtype)
        if isinstance(module, LoRALayer):
            module.add_adapter(r=r, alpha=alpha, dropout=config.dropout if isinstance(module, LoRALinear) else 0.0,
                               **kwargs)
        else:
            wrapper = _wrapper_for(module)
            dropout = config.dropout if wrapper is not LoRAEmbedding else 0.0
            _set_submodule(model, name, wrapper.from_layer(module, r=r, alpha=alpha, dropout=dropout,
                                                           fan_in_fan_out=config.fan_in_fan_out or None, **kwargs))
    if config.dora:
        for name in names:
            model.get_submodule(name).enable_dora(adapter_name)
    saved = copy.deepcopy(config)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        saved.target_modules = sorted(names)  # PEFT saves the resolved names too
    configs[adapter_name] = saved
    setattr(model, CONFIG_ATTR, configs)
    mark_only_lora_as_trainable(model, config.bias)
    for name in save_names:
        model.get_submodule(name).requires_grad_(True)
    return names


def set_adapter(model: nn.Module, adapter_names: str | Iterable[str]) -> None:
    """Activate these adapters on every LoRA layer that has them (switching task = switching A and B)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = set(getattr(model, CONFIG_ATTR, None) or {})
    for _, layer in lora_layers(model):
        known |= set(layer.r)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"adapter_names {unknown} not found; the model has {sorted(known)}")
    for _, layer in lora_layers(model):
        layer.set_adapter([n for n in names if n in layer.r])


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter from every layer (layers left with no adapter keep working as their base)."""
    configs = getattr(model, CONFIG_ATTR, None) or {}
    found = False
    for _, layer in lora_layers(model):
        if adapter_name in layer.r:
            layer.delete_adapter(adapter_name)
            found = True
    if not found and adapter_name not in configs:
        raise ValueError(f"adapter_name {adapter_name!r} not found; the model has {sorted(configs)}")
    configs.pop(adapter_name, None)


@contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the block: merged adapters are unmerged on entry
    and merged back on exit. (`modules_to_save` and trained biases stay as trained.)"""
    layers = [layer for _, layer in lora_layers(model)]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    previous = {id(layer): layer.disabled for layer in layers}
    try:
        for layer in layers:
            if layer.merged:
                layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        for layer in layers:
            layer.disabled = previous[id(layer)]
            if merged[id(layer)]:
                layer.merge(adapter_names=merged[id(layer)])


def merge_and_unload(model: nn.Module, **kwargs) -> nn.Module:
    """Replace every LoRA layer by `layer.merge_and_unload(**kwargs)` (a plain layer with the
    adapters merged into its weight). Returns the same model object, now LoRA-free.

    Each layer gets the keyword arguments its own `merge_and_unload` takes, so
    `requantize=True` reaches the 4-bit layers of a model that also has plain ones; an
    argument that no layer takes is an error.
    """
    layers = list(lora_layers(model))
    accepted = {id(layer): set(inspect.signature(layer.merge_and_unload).parameters) for _, layer in layers}
    unknown = set(kwargs) - set().union(*accepted.values()) if layers else set(kwargs)
    if unknown:
        raise TypeError(f"merge_and_unload got keyword arguments no LoRA layer takes: {sorted(unknown)}")
    for name, layer in layers:
        own = {k: v for k, v in kwargs.items() if k in accepted[id(layer)]}
        _set_submodule(model, name, layer.merge_and_unload(**own))
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its base layer, dropping the adapters (unmerging first)."""
    for name, layer in list(lora_layers(model)):
        if layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def _param_count(p: torch.Tensor) -> int:
    # A packed 4-bit weight stores two values per uint8 byte; count the values (as PEFT does for Params4bit).
    return p.numel() * 2 if p.dtype == torch.uint8 else p.numel()


def _quantized_weight_count(model: nn.Module) -> int:
    """Weights held as packed 4-bit codes in a `weight_packed` buffer (as `quant.LinearNF4`):
    `in_features * out_features` each, so QLoRA counts match PEFT's (which counts
    bitsandbytes' Params4bit as parameters)."""
    return sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m._buffers.get("weight_packed"), torch.Tensor)
               and hasattr(m, "in_features") and hasattr(m, "out_features"))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; shared (tied) tensors count once, frozen 4-bit
    weights count one per value."""
    trainable = total = 0
    for p in model.parameters():
        n = _param_count(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total + _quantized_weight_count(model)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the counts in PEFT's format."""
    trainable, total = trainable_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
