"""LoRA for `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d`, in Hugging Face PEFT's parameterisation.

`h = conv(x, W) + scaling * B(A(dropout(x)))` where A is a convolution with the base's
kernel size, stride, padding and dilation and `r` output channels (weight (r, in, *k)),
and B a 1x1 convolution with r input channels and the base's groups (weight
(out, r / groups, 1, ...)), as PEFT's `lora.Conv2d` (so the file keys and shapes are the
same: `...conv.lora_A.weight`, `...conv.lora_B.weight`). A is kaiming-uniform and B zero,
so a fresh adapter leaves the layer unchanged (LoRA sec. 4.1).

Because B is 1x1, `B(A(x))` is one convolution of x with the kernel
`delta[o, i, *k] = sum_r B[o, r] A[r, i, *k]` (groups = 1), so merging adds `scaling *
delta` to W and is exact up to rounding. With groups > 1 the update mixes channels across
groups, which a grouped kernel cannot hold: such layers train and run, but refuse to merge
(as PEFT does). `r` must then be a multiple of groups (B is grouped).

Two departures from PEFT 0.21, both where PEFT cannot be right: A also takes the base's
dilation (PEFT's A ignores it, so its output has the wrong size and the forward fails) and
padding mode (PEFT's A pads with zeros under a reflect-padded base, which its own merge
then does not reproduce).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .config import check_flag
from .layer import LoRALayer, check_adapter_args
from .registry import register_lora_layer
from .variants import DoraConvVariant

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _base_attr(name: str) -> property:
    """A read-only property giving the base layer's attribute (code reading `conv.stride` keeps working)."""
    return property(lambda self: getattr(self.base_layer, name), doc=f"The base layer's `{name}`.")


class LoRAConv(LoRALayer):
    """LoRA over an `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d` base (see the module docstring).

    Build it with `LoRAConv.from_layer(conv, r=8, alpha=16, dropout=0.0, ...)` (arguments as
    `LoRALinear.from_layer`; `init` is "kaiming" or "gaussian"). `dora=True` makes the adapter
    a DoRA adapter with PEFT's per-output-channel norms (`lora.variants.DoraConvVariant`).

    Shapes: x (N, in_channels, *spatial) or unbatched (in_channels, *spatial) -> as the base.
    """

    adapter_dict_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    in_channels = _base_attr("in_channels")
    out_channels = _base_attr("out_channels")
    kernel_size = _base_attr("kernel_size")
    stride = _base_attr("stride")
    padding = _base_attr("padding")
    dilation = _base_attr("dilation")
    groups = _base_attr("groups")
    padding_mode = _base_attr("padding_mode")

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                 adapter_name: str = "default", rslora: bool = False, init: str = "kaiming",
                 dtype: torch.dtype | None = None, dora: bool = False, lora_bias: bool = False):
        if not isinstance(base_layer, CONV_TYPES):
            raise TypeError(f"base_layer must be nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(base_layer).__name__}")
        check_adapter_args(adapter_name, r, alpha, dropout, rslora, init, dtype)
        check_flag("dora", dora)
        if isinstance(base_layer.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"base_layer: {type(base_layer).__name__} is lazy; run one forward pass first")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels  # PEFT's names
        self.fan_in_fan_out = False  # the conv kernel is (out, in / groups, *k)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init, dtype=dtype,
                         dora=dora, lora_bias=lora_bias)

    @classmethod
    def from_layer(cls, base_layer: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                   adapter_name: str = "default", rslora: bool = False, init: str = "kaiming",
                   fan_in_fan_out: bool | None = None, dtype: torch.dtype | None = None,
                   dora: bool = False, lora_bias: bool = False) -> "LoRAConv":
        """Wrap an existing conv layer (kept, not copied). `fan_in_fan_out` must be None or False."""
        if isinstance(base_layer, LoRALayer):
            raise ValueError("base_layer is already a LoRA layer; add another adapter with add_adapter() instead")
        if fan_in_fan_out is not None:
            check_flag("fan_in_fan_out", fan_in_fan_out)
            if fan_in_fan_out:
                warnings.warn("fan_in_fan_out=True for a conv base (weight is (out, in, *k)); using False",
                              stacklevel=2)
        return cls(base_layer, r=r, alpha=alpha, dropout=dropout, adapter_name=adapter_name, rslora=rslora,
                   init=init, dtype=dtype, dora=dora, lora_bias=lora_bias)

    @property
    def kernel_dim(self) -> int:
        """Spatial dimensions of the kernel: 1, 2 or 3."""
        return self.base_layer.weight.dim() - 2

    def add_adapter(self, adapter_name: str = "default", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    rslora: bool = False, init: str = "kaiming", dtype: torch.dtype | None = None,
                    activate: bool | None = None, dora: bool = False, lora_bias: bool = False) -> None:
        """As `LoRALayer.add_adapter`; `r` must be a multiple of the base's groups (B is grouped).
        `lora_bias=True` gives B a bias (PEFT's `lora_bias`): the update is `scaling * (B(A(x)) + b)`."""
        check_flag("dora", dora)
        check_flag("lora_bias", lora_bias)
        if dora and lora_bias:
            raise ValueError("lora_bias=True is not supported with dora=True (PEFT refuses it too)")
        groups = self.base_layer.groups
        if isinstance(r, int) and not isinstance(r, bool) and r > 0 and r % groups:
            raise ValueError(f"r={r} must be a multiple of groups={groups} of this {type(self.base_layer).__name__} "
                             "(lora_B is a grouped 1x1 convolution, as in PEFT)")
        if dora and not self.supports_dora(self.base_layer):
            raise ValueError(f"dora=True needs a conv layer with groups=1, got groups={groups}")
        super().add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init,
                            dtype=dtype, activate=activate, lora_bias=lora_bias)
        if dora:
            self.enable_dora(adapter_name)

    def _create_adapter(self, name, r, dropout, device, dtype):
        base = self.base_layer
        conv = type(base)
        ones = (1,) * self.kernel_dim
        self.lora_A[name] = conv(base.in_channels, r, base.kernel_size, stride=base.stride, padding=base.padding,
                                 dilation=base.dilation, bias=False, padding_mode=base.padding_mode,
                                 device=device, dtype=dtype)
        self.lora_B[name] = conv(r, base.out_channels, ones, stride=ones, groups=base.groups, bias=False,
                                 device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, init: str = "kaiming") -> None:
        """A: kaiming-uniform with a = sqrt(5) (PEFT's default) or normal with std 1/r; B: zeros."""
        self._check_known(adapter_name)
        self.init_factors(adapter_name, init)

    @classmethod
    def supports_lora_bias(cls, base_layer: nn.Module) -> bool:
        """B is a 1x1 conv, which takes a bias (one per output channel) as PEFT's."""
        return True

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`scaling * delta` shaped like the base kernel (out, in, *k), float32 (float64 for float64
        adapters); `delta[o, i, *k] = sum_r B[o, r] A[r, i, *k]`. Only defined for groups = 1."""
        self._check_known(adapter_name)
        self._check_groups("get_delta_weight")
        A = self.lora_A[adapter_name].weight  # (r, in, *k)
        B = self.lora_B[adapter_name].weight  # (out, r, *1)
        dt = self._compute_dtype(A)
        r = A.shape[0]
        delta = B.to(dt).reshape(B.shape[0], r) @ A.to(dt).reshape(r, -1)  # (out, in * prod(k))
        return delta.reshape(self.base_layer.weight.shape) * self.scaling[adapter_name]

    def _check_groups(self, what: str) -> None:
        if self.base_layer.groups > 1:
            raise ValueError(f"{what}: {self._label()} has groups={self.base_layer.groups}; its low-rank update "
                             "mixes channels across groups, which the grouped kernel cannot hold, so it cannot be "
                             "merged (PEFT refuses too). Keep the adapter unmerged")

    def check_mergeable(self, names: list[str], safe_merge: bool, label: str | None = None) -> None:
        self._check_groups("merge")
        super().check_mergeable(names, safe_merge, label)

    # ----- DoRA (lora/variants.py) -----
    @classmethod
    def supports_dora(cls, base_layer: nn.Module) -> bool:
        """PEFT's conv DoRA: per-output-channel norms of the kernel, for groups = 1."""
        return isinstance(base_layer, CONV_TYPES) and base_layer.groups == 1

    def is_dora(self, adapter_name: str) -> bool:
        return isinstance(self.lora_variant.get(adapter_name), DoraConvVariant)

    def weight_out_in(self) -> torch.Tensor:
        """The base kernel as (out, in * prod(k)), detached (a view, no copy)."""
        weight = self.base_weight().detach()
        return weight.reshape(weight.shape[0], -1)

    def enable_dora(self, adapter_name: str) -> None:
        """Turn adapter `adapter_name` into a DoRA adapter (m = per-output-channel norm of W + s delta)."""
        self._check_variant_allowed(adapter_name)
        if not self.supports_dora(self.base_layer):
            raise ValueError(f"dora=True needs a conv layer with groups=1, got groups={self.base_layer.groups}")
        if self.lora_bias_of(adapter_name) is not None:
            raise ValueError(f"adapter {adapter_name!r} has lora_bias=True, which DoRA does not support (as PEFT)")
        self._install_variant(adapter_name, DoraConvVariant())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self.disabled and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)  # (N, out, *spatial)
        if self.disabled or self.merged or not self.active_adapters:
            return result
        return self._add_updates(x, result, self._conv_update)

    def _conv_update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The plain LoRA update of adapter `name`: `scaling * B(A(dropout(x)))`, (N, out, *spatial)."""
        A, B = self.lora_A[name], self.lora_B[name]
        return B(A(self.lora_dropout[name](x.to(A.weight.dtype)))) * self.scaling[name]


class LoRAConv1d(LoRAConv):
    """`LoRAConv` for `nn.Conv1d` (PEFT's `lora.Conv1d`)."""


class LoRAConv2d(LoRAConv):
    """`LoRAConv` for `nn.Conv2d` (PEFT's `lora.Conv2d`)."""


class LoRAConv3d(LoRAConv):
    """`LoRAConv` for `nn.Conv3d` (PEFT's `lora.Conv3d`)."""


for _base, _wrapper in ((nn.Conv1d, LoRAConv1d), (nn.Conv2d, LoRAConv2d), (nn.Conv3d, LoRAConv3d)):
    register_lora_layer(_base, _wrapper, linear_like=False)
