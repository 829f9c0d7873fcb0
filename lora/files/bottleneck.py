"""Bottleneck adapters (`add_adapters`, Houlsby et al. 2019) in files (peft_type BOTTLENECK).

Keys (without `base_model.model.`): `<sublayer path>.adapter.<down|up>.<weight|bias>`.
PEFT has no such type; the layout follows its conventions so the folder reads the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..adapters import (
    AdapterConfig,
    adapter_modules,
    add_adapters,
    remove_adapters,
)
from ..model_state import BOTTLENECK_CONFIGS, LORA_CONFIGS, get_state
from .checks import check_fit, copy_into
from .folder import CONFIG_NAME, PREFIX

PEFT_TYPE = "BOTTLENECK"


def bottleneck_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors of the bottleneck adapters, by file key (`<path>.adapter.down.weight`, ...)."""
    return {f"{path}.adapter.{key}": t for path, adapter in adapter_modules(model).items()
            for key, t in adapter.state_dict(keep_vars=True).items()}


def load(model: nn.Module, config: AdapterConfig, found: dict, directory: Path,
         adapter_name: str, is_trainable: bool, rewritten_base: bool = False) -> list[str]:
    """Add the file's bottleneck adapters (or fill the model's), all checks first; returns their paths."""
    existing = get_state(model, BOTTLENECK_CONFIGS)
    if existing and adapter_name not in existing:
        raise ValueError(f"model already has bottleneck adapters {sorted(existing)}; one set per model")
    if adapter_name in get_state(model, LORA_CONFIGS):
        raise ValueError(f"adapter_name {adapter_name!r} is a LoRA adapter of this model; "
                         "a bottleneck adapter of that name would overwrite its files (use another adapter_name)")
    if existing:
        current = existing[adapter_name]
        for field in ("activation", "dropout"):  # built into the modules; a load cannot change them
            if getattr(current, field) != getattr(config, field):
                raise ValueError(f"{directory / CONFIG_NAME}: {field}={getattr(config, field)!r} differs from the "
                                 f"model's bottleneck adapter ({getattr(current, field)!r}); remove_adapters(model) first")
        expected = bottleneck_tensors(model)
        check_fit(expected, found, directory)
    else:
        grad = {id(p): p.requires_grad for p in model.parameters()}
        try:
            add_adapters(model, config, adapter_name=adapter_name)
            if not is_trainable:
                model.requires_grad_(False)
            expected = bottleneck_tensors(model)
            check_fit(expected, found, directory)
        except BaseException:
            remove_adapters(model)
            for p in model.parameters():
                p.requires_grad_(grad.get(id(p), p.requires_grad))
            raise
    copy_into(expected, found)
    return list(adapter_modules(model))


def parse(config_dict: dict) -> AdapterConfig:
    return AdapterConfig.from_peft_dict(config_dict)


def save_plan(model: nn.Module, adapter_name: str, config: AdapterConfig,
              convert_to_lora: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(live tensors by file key, the config as JSON)."""
    return {PREFIX + k: t for k, t in bottleneck_tensors(model).items()}, config.to_peft_dict()
