"""LoRA for `nn.MultiheadAttention`, as Hugging Face PEFT's `lora.MultiheadAttention`.

`nn.MultiheadAttention` keeps its query/key/value projection as one raw parameter
`in_proj_weight` (3 * embed_dim, embed_dim) and reads `out_proj.weight` directly instead
of calling `out_proj`, so no linear layer inside it can be wrapped on its own. Like PEFT,
one adapter covers both projections:

- in_proj: `in_proj_weight + scaling * B A` with A (r, embed_dim), B (3 * embed_dim, r)
  held by this layer (`lora_A`, `lora_B`);
- out_proj: a `LoRALinear` put in place of `out_proj` (same r, alpha), whose adapter keys
  are `...<mha>.base_layer.out_proj.lora_A.weight` as in PEFT's files.

PEFT merges the updates into the weights before each call and unmerges after. Here the
attention runs through `torch.func.functional_call` with the effective weights
`W + scaling * B A` passed in for that call: the same numbers, the module never changes,
and gradients reach A and B. Dropout cannot act on a weight update, so `dropout` must be 0
(PEFT ignores it). Only `_qkv_same_embed_dim` modules (the default) are supported; no DoRA.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call

from .config import check_dropout, check_flag
from .layer import LoRALayer, LoRALinear, check_adapter_args
from .registry import register_lora_layer


def _base_attr(name: str) -> property:
    return property(lambda self: getattr(self.base_layer, name), doc=f"The base layer's `{name}`.")


class LoRAMultiheadAttention(LoRALayer):
    """LoRA over an `nn.MultiheadAttention` (see the module docstring).

    Build it with `LoRAMultiheadAttention.from_layer(mha, r=8, alpha=16, ...)`; called like
    the base module (`query, key, value, key_padding_mask=..., need_weights=..., attn_mask=...`).
    """

    adapter_dict_names = ("lora_A", "lora_B")
    takes_dropout = False
    embed_dim = _base_attr("embed_dim")
    num_heads = _base_attr("num_heads")
    head_dim = _base_attr("head_dim")
    batch_first = _base_attr("batch_first")
    kdim = _base_attr("kdim")
    vdim = _base_attr("vdim")
    _qkv_same_embed_dim = _base_attr("_qkv_same_embed_dim")
    in_proj_weight = _base_attr("in_proj_weight")
    in_proj_bias = _base_attr("in_proj_bias")
    bias_k = _base_attr("bias_k")
    bias_v = _base_attr("bias_v")
    add_zero_attn = _base_attr("add_zero_attn")

    def __init__(self, base_layer: nn.MultiheadAttention, r: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                 adapter_name: str = "default", rslora: bool = False, init: str = "kaiming",
                 dtype: torch.dtype | None = None):
        if not isinstance(base_layer, nn.MultiheadAttention):
            raise TypeError(f"base_layer must be nn.MultiheadAttention, got {type(base_layer).__name__}")
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("base_layer: only nn.MultiheadAttention with kdim = vdim = embed_dim (one "
                             "in_proj_weight) is supported, as in PEFT")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError(f"base_layer.out_proj must be an nn.Linear, got {type(base_layer.out_proj).__name__}")
        check_adapter_args(adapter_name, r, alpha, dropout, rslora, init, dtype)
        self._check_no_dropout(dropout)
        super().__init__(base_layer)
        # no in_features / out_features: the module maps embed_dim to embed_dim, while PEFT's
        # (embed_dim, 3 * embed_dim) describe in_proj only and would mislead size inference
        self.fan_in_fan_out = False
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        # the out_proj adapters: a LoRALinear in place of out_proj (its base stays the original out_proj)
        base_layer.out_proj = LoRALinear.from_layer(base_layer.out_proj, r=r, alpha=alpha, adapter_name=adapter_name,
                                                    rslora=rslora, init=init, dtype=dtype)
        self.add_adapter(adapter_name, r=r, alpha=alpha, rslora=rslora, init=init, dtype=dtype, _out_proj=False)

    @staticmethod
    def _check_no_dropout(dropout) -> None:
        check_dropout(dropout)
        if dropout:
            raise ValueError(f"dropout={dropout}: LoRA on nn.MultiheadAttention acts through its weights (the "
                             "module has no linear layer to call), so there is no adapter input to drop; use 0")

    @classmethod
    def from_layer(cls, base_layer: nn.MultiheadAttention, r: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                   adapter_name: str = "default", rslora: bool = False, init: str = "kaiming",
                   fan_in_fan_out: bool | None = None, dtype: torch.dtype | None = None) -> "LoRAMultiheadAttention":
        """Wrap an existing `nn.MultiheadAttention` (kept, not copied; its `out_proj` becomes a `LoRALinear`).
        A `dropout` > 0 (e.g. from a config shared with linear targets) is ignored here with a warning."""
        if isinstance(base_layer, LoRALayer):
            raise ValueError("base_layer is already a LoRA layer; add another adapter with add_adapter() instead")
        if fan_in_fan_out:
            raise ValueError("fan_in_fan_out must be False for nn.MultiheadAttention")
        check_dropout(dropout)
        if dropout:
            warnings.warn("dropout is ignored by LoRAMultiheadAttention (it adapts the weights, as PEFT)",
                          stacklevel=2)
        return cls(base_layer, r=r, alpha=alpha, adapter_name=adapter_name, rslora=rslora, init=init, dtype=dtype)

    @property
    def out_proj_lora(self) -> LoRALinear:
        """The `LoRALinear` holding the out_proj adapters."""
        return self.base_layer.out_proj

    def add_adapter(self, adapter_name: str = "default", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    rslora: bool = False, init: str = "kaiming", dtype: torch.dtype | None = None,
                    activate: bool | None = None, _out_proj: bool = True) -> None:
        """Add an adapter to in_proj and out_proj (same r, alpha); `dropout` must be 0."""
        check_adapter_args(adapter_name, r, alpha, dropout, rslora, init, dtype)
        self._check_no_dropout(dropout)
        if activate is not None:
            check_flag("activate", activate)
        if _out_proj:
            if adapter_name in self.r:
                raise ValueError(f"adapter_name {adapter_name!r} already exists on this layer")
            self.out_proj_lora.add_adapter(adapter_name, r=r, alpha=alpha, rslora=rslora, init=init, dtype=dtype,
                                           activate=activate)
        super().add_adapter(adapter_name, r=r, alpha=alpha, rslora=rslora, init=init, dtype=dtype,
                            activate=activate)

    def _create_adapter(self, name, r, dropout, device, dtype):
        d = self.base_layer.embed_dim
        self.lora_A[name] = nn.Linear(d, r, bias=False, device=device, dtype=dtype)  # in_proj's A: (r, d)
        self.lora_B[name] = nn.Linear(r, 3 * d, bias=False, device=device, dtype=dtype)  # B: (3d, r), q|k|v rows
        self.lora_dropout[name] = nn.Identity()

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, init: str = "kaiming") -> None:
        """A: kaiming-uniform (a = sqrt(5)) or normal with std 1/r; B: zeros (as LoRALinear)."""
        self._check_known(adapter_name)
        self.init_factors(adapter_name, init)

    # ----- bookkeeping shared with the out_proj adapters -----
    def _activate(self, names: list[str]) -> None:
        super()._activate(names)
        self.out_proj_lora._activate([n for n in names if n in self.out_proj_lora.r])

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.out_proj_lora.delete_adapter(adapter_name)

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`scaling * B @ A` for in_proj_weight, (3 * embed_dim, embed_dim), float32 (float64 for float64)."""
        self._check_known(adapter_name)
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        dt = self._compute_dtype(A)
        return (B.to(dt) @ A.to(dt)) * self.scaling[adapter_name]

    def check_mergeable(self, names: list[str], safe_merge: bool, label: str | None = None) -> None:
        super().check_mergeable(names, safe_merge, label)
        self.out_proj_lora.check_mergeable(names, safe_merge, f"{label or self._label()}.out_proj")

    def merge(self, safe_merge: bool = False, adapter_names: Iterable[str] | None = None) -> None:
        """Merge into in_proj_weight and out_proj.weight (both checked before either is written)."""
        names = self._adapters_to_merge(adapter_names)
        if names and safe_merge:
            self.out_proj_lora._merged_weight(names, True, f"{self._label()}.out_proj")
        super().merge(safe_merge=safe_merge, adapter_names=names)
        if names:
            self.out_proj_lora.merge(safe_merge=safe_merge, adapter_names=names)

    def unmerge(self) -> None:
        was_merged = bool(self.merged_adapters)
        super().unmerge()
        if was_merged and self.out_proj_lora.merged_adapters:
            self.out_proj_lora.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Iterable[str] | None = None) -> nn.Module:
        """Merge and return the plain `nn.MultiheadAttention` with a plain out_proj again."""
        self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self.base_layer.out_proj = self.out_proj_lora.base_layer
        return self.base_layer

    # ----- forward -----
    def forward(self, query: torch.Tensor, *args, **kwargs):
        out_proj = self.out_proj_lora
        if out_proj.merged_adapters != self.merged_adapters:
            raise ValueError(f"{self._label()}: out_proj has merged adapters {out_proj.merged_adapters} but the "
                             f"attention has {self.merged_adapters}; merge or unmerge both (merge() on this layer)")
        if self.disabled and self.merged:
            self.unmerge()
        names = [n for n in self.active_adapters if n in out_proj.r]
        if self.disabled or self.merged or not names:
            return self.base_layer(query, *args, **kwargs)
        w_in = self.base_layer.in_proj_weight
        w_out = out_proj.base_layer.weight
        delta_in = sum(self.get_delta_weight(n) for n in names)  # (3 * embed_dim, embed_dim)
        delta_out = sum(out_proj.get_delta_weight(n) for n in names)  # (embed_dim, embed_dim)
        weights = {"in_proj_weight": w_in + delta_in.to(w_in.dtype),
                   "out_proj.base_layer.weight": w_out + delta_out.to(w_out.dtype)}
        return functional_call(self.base_layer, weights, (query, *args), kwargs)


register_lora_layer(nn.MultiheadAttention, LoRAMultiheadAttention, linear_like=True)
