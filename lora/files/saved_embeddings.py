"""Full embedding / output-head weights inside a LoRA file (PEFT's `save_embedding_layers`).

PEFT's `save_pretrained(..., save_embedding_layers=True)` (and "auto" after the vocabulary
was resized) writes the whole weight of the input embedding and of the output head next to
the adapter: `<path>.base_layer.weight` for a layer that carries LoRA, `<path>.weight` for
a plain one. They hold the rows of new tokens, so an adapter trained with them gives wrong
outputs without them; PEFT's `from_pretrained` copies them into the model, and so does
`load_adapter` (with a warning: this changes the base, and `disable_adapters` does not
bring the old rows back). Only embeddings and the output head qualify; any other base
weight in a file is still an unexpected key.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..layer import LoRALayer

SUFFIXES = (".base_layer.weight", ".weight")


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None  # transformers models; None for other modules


def _weight_for(model: nn.Module, key: str) -> torch.Tensor | None:
    """The model's embedding / head weight that file key `key` names, else None."""
    for suffix in SUFFIXES:
        if not key.endswith(suffix):
            continue
        try:
            module = model.get_submodule(key[:-len(suffix)])
        except AttributeError:
            return None
        if suffix == ".base_layer.weight":
            module = module.base_layer if isinstance(module, LoRALayer) else None
        elif isinstance(module, LoRALayer):
            return None  # a wrapped layer's weight is stored as <path>.base_layer.weight
        head = _output_head(model)
        if module is not None and (isinstance(module, nn.Embedding) or (head is not None and module is head)):
            return module.weight
        return None
    return None


def embedding_weights(model: nn.Module, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                      directory: Path) -> dict[str, torch.Tensor]:
    """{file key: the model's weight it replaces} for the embedding / head weights in `found`
    that `expected` (the adapter's own keys) does not already cover. Two keys that name one
    tied weight must hold the same values."""
    out: dict[str, torch.Tensor] = {}
    for key in sorted(set(found) - set(expected)):
        weight = _weight_for(model, key)
        if weight is not None:
            out[key] = weight
    by_tensor: dict[int, str] = {}
    for key, weight in out.items():
        first = by_tensor.setdefault(id(weight), key)
        if first != key and not torch.equal(found[first], found[key]):
            raise ValueError(f"adapter in {directory} holds different values for {first!r} and {key!r}, "
                             "which are one tied weight in this model")
    return out


def warn_replaced(keys: list[str], directory: Path) -> None:
    if keys:
        warnings.warn(f"adapter in {directory} holds the full weights {keys} (PEFT's save_embedding_layers); "
                      "they replace the model's, and disable_adapters / unload do not restore the old ones",
                      stacklevel=4)
