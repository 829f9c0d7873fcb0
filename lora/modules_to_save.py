"""Modules trained in full beside the adapters (`LoRAConfig.modules_to_save`, e.g. a
classification head), one copy per adapter, as PEFT's `ModulesToSaveWrapper`.

The original module stays untouched and frozen: it is what runs when the adapters are
disabled and for adapters that did not list this module. Each adapter that lists it gets
its own trainable deep copy, so two adapters never train, or save, each other's head.
In an adapter file the copy is stored under the module's own name (`<module>.weight`),
the layout PEFT writes.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .config import check_adapter_name


class ModulesToSave(nn.Module):
    """`original_module` plus `modules_to_save[adapter]` copies; calls go to the active
    adapter's copy when it has one, else to the original."""

    def __init__(self, original_module: nn.Module, adapter_name: str = "default"):
        super().__init__()
        if isinstance(original_module, ModulesToSave):
            raise ValueError("original_module is already wrapped; use add_adapter() for another adapter")
        if not isinstance(original_module, nn.Module):
            raise TypeError(f"original_module must be an nn.Module, got {type(original_module).__name__}")
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.training = original_module.training  # copies follow it: no dropout switched on in an eval model
        original_module.requires_grad_(False)
        self.add_adapter(adapter_name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, adapter_name: str, activate: bool | None = None) -> None:
        """A trainable copy of the original module for `adapter_name`."""
        check_adapter_name(adapter_name)
        if adapter_name in self.modules_to_save:
            raise ValueError(f"adapter_name {adapter_name!r} already has a copy of this module")
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        clone.train(self.training)
        self.modules_to_save[adapter_name] = clone
        if activate or (activate is None and self.active_adapter is None):
            self.set_adapter(adapter_name)
        else:
            clone.requires_grad_(False)

    def set_adapter(self, adapter_name: str | None) -> None:
        """Route calls to this adapter's copy (None or an adapter without a copy: the original).
        Only the active copy is trainable."""
        if adapter_name is not None:
            check_adapter_name(adapter_name)
        self.active_adapter = adapter_name
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            raise ValueError(f"adapter_name {adapter_name!r} has no copy here; copies: {self.adapter_names}")
        del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def current(self) -> nn.Module:
        """The module a call goes to now."""
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def unwrap(self, adapter_name: str | None = None) -> nn.Module:
        """The module to leave in the model when the adapters are merged away: the copy of
        `adapter_name` (default: the active one), or the original."""
        name = self.active_adapter if adapter_name is None else adapter_name
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    def __getattr__(self, name: str):
        """Attributes of the wrapped module (`head.weight`, `head.out_features`) read through,
        from the module a call would use."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__["_modules"]
            copies = modules["modules_to_save"]
            active = self.__dict__.get("active_adapter")
            target = copies[active] if (not self.__dict__.get("disabled") and active in copies) \
                else modules["original_module"]
            return getattr(target, name)

    def extra_repr(self) -> str:
        return f"active_adapter={self.active_adapter!r}"


def adapter_state(wrapper: ModulesToSave, adapter_name: str) -> dict[str, torch.Tensor]:
    """The copy's tensors under the module's own names ({"weight": ..., "bias": ...})."""
    return dict(wrapper.modules_to_save[adapter_name].state_dict())
