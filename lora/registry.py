"""The one extension point for layer types: base module type -> LoRA layer class.

`apply_lora` wraps a targeted module with the LoRA layer registered for its type (the
first match along the type's MRO, so subclasses of `nn.Linear` get `LoRALinear`). The
built-in types register here exactly as a user's own type would:

    nn.Linear -> LoRALinear, nn.Embedding -> LoRAEmbedding        (below)
    nn.Conv1d/2d/3d -> LoRAConv1d/2d/3d                            (lora/conv.py)
    quant.Linear4bit -> QLoRALinear                                (lora/qlora.py)

plus GPT-2's `transformers.pytorch_utils.Conv1D`, recognised by name (so transformers need
not be imported) and wrapped by `LoRALinear` with `fan_in_fan_out=True`.

A wrapper class is a `LoRALayer` subclass with a classmethod
`from_layer(base, r=, alpha=, dropout=, adapter_name=, rslora=, init=, fan_in_fan_out=, dtype=)`
and the methods `_create_adapter`, `reset_adapter`, `get_delta_weight` (shaped like
`base_weight()`, which merge writes into) and `forward`; injection, merge, `disable_adapters`
and the adapter files then work unchanged. Optional: the classmethods `supports_dora(base)` and
`supports_lora_bias(base)` (False by default: `apply_lora` refuses `dora=True` / `lora_bias=True`
on that type before touching the model; `lora_bias=True` is passed to `from_layer` only when set). A complete 20-line example (a user's layer whose
kernel is stored (in, out)) is `test_a_users_own_layer_type_through_the_registry` in
tests/test_custom_models.py.
"""
from __future__ import annotations

from torch import nn

from .layer import LoRAEmbedding, LoRALayer, LoRALinear, _is_conv1d

# base layer type -> LoRA wrapper type; "linear-like" types are the ones "all-linear" picks.
LORA_LAYER_TYPES: dict[type, type] = {}
LINEAR_LIKE_TYPES: set[type] = set()


def register_lora_layer(base_cls: type, wrapper_cls: type, linear_like: bool = True) -> None:
    """Let `apply_lora` wrap `base_cls` layers with `wrapper_cls` (which needs a
    `from_layer(base, r=, alpha=, dropout=, adapter_name=, rslora=, init=, fan_in_fan_out=, dtype=)`).
    `linear_like=True` makes "all-linear" include this type."""
    if not (isinstance(base_cls, type) and issubclass(base_cls, nn.Module)):
        raise TypeError(f"base_cls must be an nn.Module subclass, got {base_cls!r}")
    if not (isinstance(wrapper_cls, type) and issubclass(wrapper_cls, LoRALayer)):
        raise TypeError(f"wrapper_cls must be a LoRALayer subclass, got {wrapper_cls!r}")
    if not callable(getattr(wrapper_cls, "from_layer", None)):
        raise TypeError(f"wrapper_cls {wrapper_cls.__name__} must define a classmethod from_layer(base, r=, ...)")
    if not isinstance(linear_like, bool):
        raise TypeError(f"linear_like must be a bool, got {type(linear_like).__name__}")
    LORA_LAYER_TYPES[base_cls] = wrapper_cls
    if linear_like:
        LINEAR_LIKE_TYPES.add(base_cls)
    else:
        LINEAR_LIKE_TYPES.discard(base_cls)


def wrapper_for(module: nn.Module) -> type | None:
    """The LoRA layer class registered for `module`'s type (nearest in its MRO), or None."""
    if _is_conv1d(module):
        return LoRALinear
    for cls in type(module).__mro__:
        if cls in LORA_LAYER_TYPES:
            return LORA_LAYER_TYPES[cls]
    return None


def is_linear_like(module: nn.Module) -> bool:
    """Whether "all-linear" picks `module` (a LoRA layer counts as its base layer)."""
    if isinstance(module, LoRALayer):
        return is_linear_like(module.base_layer)
    return _is_conv1d(module) or any(cls in LINEAR_LIKE_TYPES for cls in type(module).__mro__)


def supported_type_names() -> list[str]:
    """Names of the base types LoRA can wrap (for error messages)."""
    return sorted({c.__name__ for c in LORA_LAYER_TYPES} | {"Conv1D"})


register_lora_layer(nn.Linear, LoRALinear)
register_lora_layer(nn.Embedding, LoRAEmbedding, linear_like=False)
