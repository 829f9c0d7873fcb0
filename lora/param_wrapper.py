"""LoRA on a raw `nn.Parameter` (PEFT's `target_parameters`), e.g. mixture-of-experts
weights stored as one 3-D parameter instead of one `nn.Linear` per expert.

The wrapped module runs unchanged; for the call its parameter is replaced by
`W + scaling * delta` (`torch.func.functional_call`), so gradients reach A and B through
whatever the module does with its weight. Layout and file keys follow PEFT's
`ParamWrapper`, so adapter files cross-load:

- a 2-D parameter (out, in): `lora_A` is `nn.Linear(in, r)`, `lora_B` `nn.Linear(r, out)`,
  delta = B @ A, as `LoRALinear`;
- a 3-D parameter (E, a, b) holds E experts: `lora_A` is `nn.Linear(b, r * E)` and
  `lora_B` `nn.Linear(r * E, a)`; expert e's factors are `A.reshape(E, r, b)[e]` (rows
  grouped by expert) and `B.reshape(a, r, E)[:, :, e]` (columns interleaved), and
  delta[e] = B_e @ A_e, shape (a, b) like W[e].
- Several parameters of one module: one wrapper each, nested (the first targeted is the
  innermost, `...base_layer.lora_A.weight` in the file), as PEFT nests them.

Dropout is refused (there is no input to drop: the module may use W in any way), as are
DoRA and merged-in-place mixed batches; PEFT refuses the same.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .config import INIT_MODES, check_choice
from .layer import LoRALayer


def _owner(module: nn.Module) -> tuple[nn.Module, str]:
    """The module that really holds the parameters under nested wrappers, and the prefix
    of its name as seen from `module` ("base_layer.base_layer." for two wrappers)."""
    prefix = ""
    while isinstance(module, LoRAParameter):
        module, prefix = module.base_layer, prefix + "base_layer."
    return module, prefix


class LoRAParameter(LoRALayer):
    """LoRA on `getattr(base_layer, parameter_name)`, a 2-D or 3-D float `nn.Parameter`."""

    adapter_dict_names = ("lora_A", "lora_B")
    wraps_lora_layers = True

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, *, adapter_name: str = "default", rslora: bool = False,
                 init: str = "kaiming", dtype: torch.dtype | None = None):
        if not isinstance(base_layer, nn.Module):
            raise TypeError(f"base_layer must be an nn.Module, got {type(base_layer).__name__}")
        param = self._check_parameter(base_layer, parameter_name)
        if dropout != 0:
            raise ValueError(f"dropout must be 0 for LoRA on a parameter ({parameter_name!r}), got {dropout!r}: "
                             "the module may use its weight in any way, so there is no input to drop out")
        super().__init__(base_layer)  # freezes everything below, inner wrappers' adapters too
        inner = base_layer
        while isinstance(inner, LoRAParameter):  # their active adapters stay trainable
            inner._activate(inner.active_adapters)
            inner = inner.base_layer
        self.parameter_name = parameter_name
        if param.dim() == 3:
            self.num_experts, self.out_features, self.in_features = param.shape  # (E, a, b)
        else:
            self.num_experts, (self.out_features, self.in_features) = 1, param.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.add_adapter(adapter_name, r, alpha, dropout, rslora, init, dtype)

    @staticmethod
    def _check_parameter(base_layer: nn.Module, parameter_name) -> nn.Parameter:
        if not isinstance(parameter_name, str) or not parameter_name:
            raise TypeError(f"parameter_name must be a non-empty str, got {parameter_name!r}")
        owner, _ = _owner(base_layer)
        param = owner._parameters.get(parameter_name)
        if param is None:
            raise ValueError(f"parameter_name {parameter_name!r} is not a parameter of {type(owner).__name__} "
                             f"(it has {list(owner._parameters)})")
        if not param.is_floating_point() or param.dim() not in (2, 3):
            raise ValueError(f"parameter {parameter_name!r} must be a 2-D (out, in) or 3-D (experts, a, b) float "
                             f"tensor, got shape {tuple(param.shape)} {param.dtype}")
        wrapped = base_layer
        while isinstance(wrapped, LoRAParameter):
            if wrapped.parameter_name == parameter_name:
                raise ValueError(f"parameter {parameter_name!r} already has a LoRA wrapper; "
                                 "add another adapter with add_adapter() instead")
            wrapped = wrapped.base_layer
        return param

    # ----- the adapter -----
    def _create_adapter(self, name, r, dropout, device, dtype):
        if dropout != 0:
            raise ValueError(f"dropout must be 0 for LoRA on parameter {self.parameter_name!r}, got {dropout!r}")
        E = self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, r * E, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r * E, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Identity()

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, init: str = "kaiming") -> None:
        """A: kaiming-uniform with a = sqrt(5) (PEFT's default) or normal with std 1/r
        ("gaussian"); B: zeros, so a fresh adapter changes nothing."""
        self._check_known(adapter_name)
        check_choice("init", init, INIT_MODES)
        self.init_factors(adapter_name, init)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A, shaped like the parameter: (out, in), or (E, a, b) per expert."""
        A = self.lora_A[adapter_name].weight  # (r * E, in)
        B = self.lora_B[adapter_name].weight  # (out, r * E)
        s = self.scaling[adapter_name]
        if self.base_weight().dim() == 2:
            return (B @ A) * s
        E = self.num_experts
        A3 = A.reshape(E, -1, A.shape[-1])  # (E, r, b): rows grouped by expert
        B3 = B.reshape(B.shape[0], -1, E)  # (a, r, E): columns interleaved
        return torch.einsum("ore,eri->eoi", B3, A3) * s  # (E, a, b)

    def base_weight(self) -> torch.Tensor:
        owner, _ = _owner(self.base_layer)
        return getattr(owner, self.parameter_name)

    def weight_holder(self) -> tuple[nn.Module, nn.Parameter]:
        """(the module that really holds the adapted parameter, the parameter): what merge
        writes into, for the tied-weight check (other holders of it are tied modules)."""
        owner, _ = _owner(self.base_layer)
        return owner, owner._parameters[self.parameter_name]

    # ----- forward -----
    def forward(self, *args, **kwargs):
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        if self.disabled or not names:
            return self.base_layer(*args, **kwargs)
        weight = self.base_weight()
        delta = sum(self.get_delta_weight(n).to(weight.dtype) for n in names)
        _, prefix = _owner(self.base_layer)
        return functional_call(self.base_layer, {prefix + self.parameter_name: weight + delta}, args, kwargs)

    def extra_repr(self) -> str:
        return (f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}, "
                f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}")
