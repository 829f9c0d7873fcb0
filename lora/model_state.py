"""Everything this library attaches to a user's model, listed and accessed in one place.

Most adapter state lives in the modules the library puts into the model (LoRA layers,
`Adapter` children); what belongs to the model as a whole is kept as plain attributes
on the model object itself, so it travels with the model (`copy.deepcopy`, pickling)
and is dropped with it. These are all of them:

| attribute            | set by                          | value                                          |
| -------------------- | ------------------------------- | ---------------------------------------------- |
| `lora_configs`       | `apply_lora`, `load_adapter`    | {adapter name: `LoRAConfig`} of the LoRA adapters applied |
| `bottleneck_configs` | `add_adapters`                  | {adapter name: `AdapterConfig`} (one set per model) |
| `_bottleneck_hooks`  | `add_adapters`                  | {sublayer path: forward-hook handle applying its `Adapter`} |
| `_lora_fast_path_hooks` | `apply_lora`                 | {path: handle of a no-op forward pre-hook on an `nn.TransformerEncoderLayer` holding LoRA layers} |

Inside the model, the library also adds: LoRA layers (`lora.LoRALayer` subclasses) in
place of the targeted layers, and a child named `adapter` (a `lora.Adapter`) on each
sublayer `add_adapters` selected. `unload`, `merge_and_unload` and `remove_adapters`
take all of it out again.

Read and write these attributes only through the functions below, so this table stays
the complete list.
"""
from __future__ import annotations

from torch import nn

LORA_CONFIGS = "lora_configs"
BOTTLENECK_CONFIGS = "bottleneck_configs"
BOTTLENECK_HOOKS = "_bottleneck_hooks"
# PyTorch's fused inference path of nn.TransformerEncoderLayer reads its children's weights
# directly and would skip LoRA layers inside it; it is not taken while a module in the
# layer has a forward hook, so apply_lora adds a no-op one (removed by unload / merge_and_unload).
FAST_PATH_HOOKS = "_lora_fast_path_hooks"
MODEL_ATTRIBUTES = (LORA_CONFIGS, BOTTLENECK_CONFIGS, BOTTLENECK_HOOKS, FAST_PATH_HOOKS)


def _check_attr(attr: str) -> str:
    if attr not in MODEL_ATTRIBUTES:
        raise ValueError(f"attr must be one of {MODEL_ATTRIBUTES} (the attributes lora attaches to a model), "
                         f"got {attr!r}")
    return attr


def get_state(model: nn.Module, attr: str) -> dict:
    """The live dict stored under `attr` on `model` (edits reach the model), or a new empty
    dict when there is none (store it with `set_state`)."""
    value = getattr(model, _check_attr(attr), None)
    return {} if value is None else value  # an existing empty dict is returned itself (edits reach the model)


def has_state(model: nn.Module, attr: str) -> bool:
    """Whether `model` carries the attribute `attr` at all (even an empty dict)."""
    return hasattr(model, _check_attr(attr))


def set_state(model: nn.Module, attr: str, value: dict) -> None:
    """Store `value` (a dict) under `attr` on `model`."""
    if not isinstance(value, dict):
        raise TypeError(f"value must be a dict, got {type(value).__name__}")
    setattr(model, _check_attr(attr), value)


def drop_state(model: nn.Module, *attrs: str) -> None:
    """Remove these attributes from `model` (absent ones are skipped)."""
    for attr in attrs:
        if hasattr(model, _check_attr(attr)):
            delattr(model, attr)


def lora_configs(model: nn.Module) -> dict:
    """{adapter name: LoRAConfig} of the LoRA adapters applied to `model` (live dict, maybe empty)."""
    return get_state(model, LORA_CONFIGS)
