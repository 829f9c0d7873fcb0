"""Finding and replacing submodules of any `nn.Module` by their qualified names.

One rule for which module names a target list selects, shared by `quant.quantize_model`,
`lora.apply_lora` (`target_modules`, `exclude_modules`, `modules_to_save`) and
`lora.add_adapters` (`after`). It is the rule of Hugging Face PEFT
(`peft.tuners.tuners_utils.check_target_module_exists`):

- a str is a regular expression that must match the *whole* qualified name
  (`r".*\\.(q|v)_proj"`);
- a list (or tuple, set) holds plain names: an entry matches a module named exactly so,
  or whose name ends in "." + the entry (`"q_proj"` matches `"layers.0.attn.q_proj"`).
  List entries are not regexes: `["attn.*"]` matches only a module literally named so.

This module lives in `quant/` because `quant` is the bottom layer (quant <- loralab_kernels <- lora)
and `quantize_model` needs it; it imports nothing but torch and `re`.
"""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn


def name_matches(patterns: str | Iterable[str] | None, name: str) -> bool:
    """Whether the module called `name` is selected by `patterns` (PEFT's rule, see module doc).

    Args:
        patterns: None or an empty list (selects nothing), a regex str for the full name,
            or an iterable of names / dotted suffixes.
        name: a qualified module name such as "layers.0.attn.q_proj".
    """
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at the dotted `path` of `model` ("layers.0.attn.q_proj"), in place.

    The parent must exist (`model.get_submodule` raises AttributeError naming the missing
    part otherwise); the root itself (path "") cannot be replaced in place."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty dotted module name, got {path!r} (the root cannot be replaced)")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
