"""LoRA layers: a frozen base layer plus one or more low-rank adapters.

`h = base(x) + scaling * B(A(dropout(x)))` with `scaling = alpha / r` (LoRA sec. 4.1,
Hu et al. 2021) or `alpha / sqrt(r)` (rsLoRA). B starts at zero so a fresh layer equals
its base layer exactly (LoRA sec. 4.1: "zero initialization for B").

Layout (the names of Hugging Face PEFT, so state dicts line up):
`base_layer`, `lora_A[name]`, `lora_B[name]`, `lora_dropout[name]`, `r[name]`,
`alpha[name]`, `scaling[name]`, `active_adapters`, `merged_adapters`.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import (
    INIT_MODES,
    check_adapter_name,
    check_alpha,
    check_choice,
    check_dropout,
    check_flag,
    check_init,
    check_rank,
    rewrites_base,
    scaling_for,
)
from .init import check_init_rank, init_kind, olora, pissa, pissa_niter
from .variants import DoraEmbeddingVariant, DoraLinearVariant, DoraMagnitude, LoraVariant

__all__ = ["DoraMagnitude", "LoRAEmbedding", "LoRALayer", "LoRALinear", "LoraVariant", "adapter_name_list",
           "check_adapter_args"]


def check_adapter_args(adapter_name, r, alpha, dropout, rslora=False, init="kaiming", dtype=None) -> None:
    """Validate the arguments of one new adapter (before any layer or weight is touched)."""
    check_adapter_name(adapter_name)
    check_rank(r)
    check_alpha(alpha)
    check_dropout(dropout)
    check_flag("rslora", rslora)
    check_init(init)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32) or None, got {dtype!r}")


def _check_device(device):
    """None, or something `torch.device` accepts (a ValueError naming `device` otherwise)."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be None, a torch.device or a device string such as 'cpu', "
                         f"got {device!r} ({err})") from None




def adapter_name_list(adapter_names, name: str = "adapter_names", allow_empty: bool = False) -> list[str]:
    """`adapter_names` as a list: one str is one name (never its characters); at least one
    name unless `allow_empty`."""
    if isinstance(adapter_names, str):
        names = [adapter_names]
    elif isinstance(adapter_names, (list, tuple)):
        names = list(adapter_names)
    else:
        raise TypeError(f"{name} must be an adapter name (str) or a list of them, got {type(adapter_names).__name__}")
    if not names and not allow_empty:
        raise ValueError(f"{name} must name at least one adapter, got an empty list "
                         "(to run the base layers alone use disable_adapters(model))")
    for n in names:
        check_adapter_name(n, name)
    return names


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `transformers.pytorch_utils.Conv1D`: a linear layer whose weight is (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def _base_device_dtype(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the base layer and its floating dtype (float32 if it has none, e.g. 4-bit)."""
    device, dtype = torch.device("cpu"), None
    for t in list(base.parameters()) + list(base.buffers()):
        device = t.device
        if t.is_floating_point():
            dtype = t.dtype
            break
    return device, dtype


def _default_adapter_dtype(base_dtype: torch.dtype | None) -> torch.dtype:
    """float32 adapters unless the base is float64: as PEFT's `autocast_adapter_dtype=True`,
    half-precision bases get float32 adapters for stable optimizer updates."""
    return torch.float64 if base_dtype == torch.float64 else torch.float32


def _check_base_shape(base_layer: nn.Module, in_features: int, out_features: int, fan_in_fan_out: bool) -> None:
    """A given base layer must have the sizes the wrapper is told, or forward fails far away."""
    if not isinstance(base_layer, nn.Module):
        raise TypeError(f"base_layer must be an nn.Module, got {type(base_layer).__name__}")
    sizes = (getattr(base_layer, "in_features", None), getattr(base_layer, "out_features", None))
    weight = getattr(base_layer, "weight", None)
    if None in sizes and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
            and not isinstance(weight, nn.parameter.UninitializedParameter):
        sizes = tuple(weight.shape) if fan_in_fan_out else tuple(reversed(weight.shape))
    if None not in sizes and sizes != (in_features, out_features):
        raise ValueError(f"in_features, out_features = ({in_features}, {out_features}) do not match base_layer "
                         f"{type(base_layer).__name__} with ({sizes[0]}, {sizes[1]})")


class LoRALayer(nn.Module):
    """Adapter bookkeeping shared by `LoRALinear` and `LoRAEmbedding`.

    Subclasses define `adapter_dict_names` (the containers keyed by adapter name),
    `_create_adapter`, `get_delta_weight` and `forward`.
    """

    adapter_dict_names: tuple[str, ...] = ()
    # Whether adapters take `dropout` on their input; `apply_lora` passes 0 to types without
    # an adapter input to drop (token ids, weight-level updates), as PEFT ignores it there.
    takes_dropout: bool = True
    row_adapters = None  # the adapter of each batch row while `lora.mixed_batch.use_adapters` runs
    # True: merge() keeps a copy of the pre-merge base weight (one more weight's worth of
    # memory while merged) so unmerge() restores it bit-exact. False (the default, PEFT's
    # behaviour): unmerge() subtracts the delta again, which rounds twice, so each
    # merge/unmerge cycle of a bfloat16 layer moves about 1/4 of its weights by an ulp.
    # Doubling a dense model's weight memory on merge would surprise more users than that;
    # QLoRALinear always keeps its 4-bit original, where re-quantizing compounds instead.
    keep_premerge_weight: bool = False
    # True for layers that adapt one parameter of the module they wrap (`LoRAParameter`):
    # several such wrappers nest around one module, as PEFT's `ParamWrapper`s do.
    wraps_lora_layers: bool = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if isinstance(base_layer, LoRALayer) and not self.wraps_lora_layers:
            raise ValueError("base_layer is already a LoRA layer; add another adapter with add_adapter() instead")
        if not isinstance(base_layer, nn.Module):
            raise TypeError(f"base_layer must be an nn.Module, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        # {adapter: LoraVariant} for adapters that are not plain LoRA (DoRA); see lora/variants.py
        self.lora_variant: dict[str, LoraVariant] = {}
        self.disabled = False
        self.tied_with: list[str] = []  # other modules holding our base weight (set by apply_lora)
        self.path: str | None = None  # qualified name in the model (set by apply_lora), for messages
        self._premerge_weight: torch.Tensor | None = None  # base weight before the first merge (see merge)
        self._premerge_bias: torch.Tensor | None = None  # and its bias, when keep_premerge_weight
        # {adapter: (A0, B0)} right after an init that rewrote the base (PiSSA, OLoRA): what
        # `save_adapter(..., convert_to_lora=True)` subtracts to make a plain LoRA of the original base.
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # New modules follow the wrapped layer's mode: a wrapper created under model.eval()
        # must not bring dropout in training mode (PEFT does the same).
        self.training = base_layer.training  # not train(): that would also reset the base's children
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # ----- the base layer's tensors, for code that reads them (as PEFT's layers expose them) -----
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, without the adapters (PEFT's `LoraLayer.weight`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (PEFT's `LoraLayer.bias`)."""
        return self.base_layer.bias

    # ----- adapter management -----
    @property
    def active_adapter(self) -> str | None:
        return self.active_adapters[0] if self.active_adapters else None

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add_adapter(self, adapter_name: str = "default", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    rslora: bool = False, init: str = "kaiming", dtype: torch.dtype | None = None,
                    activate: bool | None = None, lora_bias: bool = False) -> None:
        """Add a fresh adapter. It becomes active if it is the first one (or `activate=True`).

        `lora_bias=True` gives `lora_B` a trainable bias b, zero at the start (PEFT's
        `lora_bias`): the update becomes `scaling * (B A x + b)`; layer types that support it
        say so in `supports_lora_bias`. Its modules take this layer's training flag."""
        check_adapter_args(adapter_name, r, alpha, dropout, rslora, init, dtype)
        if activate is not None:
            check_flag("activate", activate)
        check_flag("lora_bias", lora_bias)
        if adapter_name in self.r:
            raise ValueError(f"adapter_name {adapter_name!r} already exists on this layer; "
                             "LoRA cannot be applied twice with the same adapter name")
        if lora_bias:
            self.check_lora_bias_allowed(init)
        self.check_init_allowed(init, r)
        device, base_dtype = _base_device_dtype(self.base_layer)
        dtype = dtype or _default_adapter_dtype(base_dtype)
        self._create_adapter(adapter_name, r, dropout, device, dtype)
        if lora_bias:
            B = self.lora_B[adapter_name]  # weight (out, r, *1): the bias has one entry per output (channel)
            B.bias = nn.Parameter(torch.zeros(B.weight.shape[0], device=device, dtype=dtype))
            if not isinstance(getattr(self.base_layer, "bias", None), torch.Tensor):
                warnings.warn(f"lora_bias=True on {self._label()}, whose base layer has no bias: the adapter "
                              "trains and runs, but cannot be merged (there is no base bias to add scaling * b to)",
                              UserWarning, stacklevel=2)
        self._follow_training_flag(adapter_name)
        self.r[adapter_name] = r
        self.set_scale(adapter_name, alpha, rslora)
        self.reset_adapter(adapter_name, init)
        if activate or (activate is None and not self.active_adapters):
            self.set_adapter(self.active_adapters + [adapter_name])

    def check_init_allowed(self, init: str, r: int) -> None:
        """Raise ValueError if `init` cannot start an adapter of rank `r` here (before anything changes).
        Only kaiming/gaussian by default; `LoRALinear` also takes the base-rewriting inits."""
        if rewrites_base(init):
            raise ValueError(f"init={init!r} is not supported by {type(self).__name__} (it rewrites a linear "
                             "layer's weight from its SVD/QR); use init='kaiming' or 'gaussian'")

    def _check_rewrite_allowed(self, init: str) -> None:
        """A base-rewriting init needs a layer with no adapter yet: merged adapters live in the
        weight it would factor, and other adapters were trained on the weight it would replace."""
        if self.merged_adapters:
            raise ValueError(f"init={init!r} on a merged layer: adapters {self.merged_adapters} are merged into "
                             "the base weight it would factor; unmerge() (or use a fresh layer) first")
        if self.r:
            raise ValueError(f"init={init!r} rewrites the base weight, which adapters {self.adapter_names} of "
                             "this layer were trained on; use it on a layer without adapters")
        if self.tied_with:
            raise ValueError(f"init={init!r} would rewrite a base weight tied to {self.tied_with}")

    @classmethod
    def supports_lora_bias(cls, base_layer: nn.Module) -> bool:
        """Whether this layer type can give `lora_B` a bias (`lora_bias=True`); none by default."""
        return False

    def check_lora_bias_allowed(self, init: str) -> None:
        """ValueError unless `lora_bias=True` fits this layer: a type with a `lora_B` module
        (`supports_lora_bias`) and an init that leaves the base alone (PEFT allows the bias with
        its default init only: PiSSA/OLoRA/LoftQ factor the base with no bias term). A base
        without a bias can train and run such an adapter but cannot merge it (add_adapter warns)."""
        if not self.supports_lora_bias(self.base_layer):
            raise ValueError(f"lora_bias=True is not supported by {type(self).__name__} over "
                             f"{type(self.base_layer).__name__} (PEFT refuses it there too); it needs a lora_B "
                             "module: linear (dense or 4-bit) and conv layers")
        if rewrites_base(init):
            raise ValueError(f"lora_bias=True with init={init!r} is not supported (as in PEFT): that init "
                             "factors the base weight and has no bias term; use init='kaiming'")

    def lora_bias_of(self, adapter_name: str) -> torch.Tensor | None:
        """The bias b of adapter `adapter_name`'s `lora_B` (`lora_bias=True`), or None."""
        B = getattr(self, "lora_B", None)
        module = B[adapter_name] if isinstance(B, nn.ModuleDict) and adapter_name in B else None
        bias = getattr(module, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def lora_bias_delta(self, adapter_name: str) -> torch.Tensor | None:
        """`scaling * b` (out,), float32 (float64 for float64 adapters): what merging adds to the
        base bias; None for an adapter without `lora_bias`."""
        b = self.lora_bias_of(adapter_name)
        return None if b is None else b.to(self._compute_dtype(b)) * self.scaling[adapter_name]

    def _follow_training_flag(self, adapter_name: str) -> None:
        """Put the new adapter's modules (A, B, dropout, ...) in this layer's mode."""
        for dict_name in self.adapter_dict_names + ("lora_dropout",):
            container = getattr(self, dict_name, None)
            if container is None:
                continue
            container.training = self.training
            if adapter_name in container and isinstance(container[adapter_name], nn.Module):
                container[adapter_name].train(self.training)

    @torch.no_grad()
    def init_factors(self, adapter_name: str, init: str = "kaiming") -> None:
        """The standard start of `lora_A[name]` / `lora_B[name]` modules: A kaiming-uniform with
        a = sqrt(5) (as nn.Linear; PEFT's default) or normal with std 1/r (PEFT's "gaussian");
        B zeros, and a `lora_bias` zeros, so a fresh adapter changes nothing (LoRA sec. 4.1)."""
        A = self.lora_A[adapter_name].weight
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter_name].weight)
        if self.lora_bias_of(adapter_name) is not None:
            nn.init.zeros_(self.lora_bias_of(adapter_name))

    def _check_variant_allowed(self, adapter_name: str) -> None:
        """Before a variant (DoRA) is enabled: a known adapter that is not merged."""
        self._check_known(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before enabling DoRA")

    def _install_variant(self, adapter_name: str, variant) -> None:
        """Initialise `variant` for the adapter, hold it, and put its magnitude in this
        layer's mode, trainable when the adapter is active."""
        variant.init(self, adapter_name)
        self.lora_variant[adapter_name] = variant
        self._follow_training_flag(adapter_name)
        self.lora_magnitude_vector[adapter_name].weight.requires_grad_(adapter_name in self.active_adapters)

    def _add_updates(self, x: torch.Tensor, result: torch.Tensor, update) -> torch.Tensor:
        """`result` (the base layer's output) plus every active adapter's update: its variant's
        forward where it has one (DoRA, which also reads the base output as it came), else
        `update(name, x)`, the layer type's plain LoRA update, cast to `result`'s dtype."""
        base_out = result
        for name in self.active_adapters:
            if name in self.lora_variant:
                result = self.lora_variant[name].forward(self, name, x, result, base_out)
            else:
                result = result + update(name, x).to(result.dtype)
        return result

    def _check_known(self, adapter_name, name: str = "adapter_name") -> str:
        """A valid name of an adapter this layer has, else ValueError/TypeError naming `name`."""
        check_adapter_name(adapter_name, name)
        if adapter_name not in self.r:
            raise ValueError(f"{name} {adapter_name!r} not found; this layer has {self.adapter_names}")
        return adapter_name

    def set_scale(self, adapter_name: str, alpha: float, rslora: bool = False) -> None:
        """Set `alpha` and `scaling = alpha / r` (or `alpha / sqrt(r)` with rsLoRA) of one adapter."""
        self._check_known(adapter_name)
        check_alpha(alpha)
        check_flag("rslora", rslora)
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before changing its scaling")
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = scaling_for(self.r[adapter_name], alpha, rslora)

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Make these adapters active (trainable, used in forward); the others inactive and frozen.

        `adapter_names` is one name or a non-empty list (use `disabled = True` or
        `disable_adapters(model)` to run the base alone)."""
        names = adapter_name_list(adapter_names)
        unknown = [n for n in names if n not in self.r]
        if unknown:
            raise ValueError(f"adapter_names {unknown} not found; this layer has {self.adapter_names}")
        self._activate(names)

    def _activate(self, names: list[str]) -> None:
        """Set the active adapters (maybe none: bookkeeping after a delete) and their requires_grad."""
        self.active_adapters = list(names)
        for dict_name in self.adapter_dict_names:
            container = getattr(self, dict_name)
            for name in self.r:
                if name not in container:  # e.g. no DoRA magnitude for a plain LoRA adapter
                    continue
                obj = container[name]
                params = [obj] if isinstance(obj, nn.Parameter) else list(obj.parameters())
                for p in params:
                    p.requires_grad_(name in names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove one adapter (it must not be merged)."""
        self._check_known(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before deleting it")
        for dict_name in (*self.adapter_dict_names, "lora_dropout"):  # dropout holds no weights, but is per adapter
            container = getattr(self, dict_name, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        for d in (self.r, self.alpha, self.scaling):
            del d[adapter_name]
        self.lora_variant.pop(adapter_name, None)
        self.initial_factors.pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    # ----- merge -----
    def base_weight(self) -> torch.Tensor:
        """The float weight that merge writes into (overridden by layers without one)."""
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"{type(self.base_layer).__name__} has no float weight to merge into")
        return weight

    def _adapters_to_merge(self, adapter_names: Iterable[str] | None) -> list[str]:
        """The active (or given) adapters not merged yet; unknown names raise ValueError."""
        if adapter_names is None:
            names = list(self.active_adapters)
        else:  # an empty list merges nothing (as PEFT)
            names = adapter_name_list(adapter_names, allow_empty=True)
        for name in names:
            if name not in self.r:
                raise ValueError(f"adapter_names: {name!r} not found; this layer has {self.adapter_names}")
        return [name for name in dict.fromkeys(names) if name not in self.merged_adapters]

    def _label(self) -> str:
        """How messages name this layer: its path in the model when apply_lora recorded one."""
        return self.path or f"this {type(self).__name__}"

    def check_mergeable(self, names: list[str], safe_merge: bool, label: str | None = None) -> None:
        """Raise ValueError (naming `label`, the layer's path when known) if merging `names`
        would be wrong: a tied base weight (the update would reach every module sharing it,
        and twice when both carry adapters), a meta weight, or with `safe_merge` a non-finite
        base weight or delta. Called before anything is written."""
        label = label or self._label()
        if self.tied_with:
            raise ValueError(f"cannot merge into {label}: its base weight is tied to (the same Parameter as) "
                             f"{self.tied_with}; merging would change those modules too (and apply the update "
                             "twice when both have adapters). Untie the weights first, e.g. "
                             "`head.weight = nn.Parameter(embed.weight.detach().clone())`")
        weight = self.base_weight()
        if weight.is_meta:
            raise ValueError(f"cannot merge into {label}: its base weight is on the meta device (no data); "
                             "load real weights first")
        self._check_bias_mergeable(names, label)
        if safe_merge:
            if not torch.isfinite(weight).all():
                raise ValueError(f"base weight of {label} is not finite (it already holds inf or nan, "
                                 "before any adapter); nothing was written")
            self._check_deltas_finite(names, label)

    def _check_bias_mergeable(self, names: list[str], label: str) -> None:
        """An adapter with `lora_bias` merges `scaling * b` into the base bias, which must exist
        (PEFT raises at merge time too; here nothing has been written yet)."""
        with_bias = [n for n in names if self.lora_bias_of(n) is not None]
        if with_bias and not isinstance(getattr(self.base_layer, "bias", None), torch.Tensor):
            raise ValueError(f"cannot merge adapters {with_bias} into {label}: they have lora_bias=True (a bias on "
                             "lora_B) and the base layer has no bias to add scaling * b to; keep them unmerged")

    def _check_deltas_finite(self, names: list[str], label: str) -> None:
        """safe_merge's second check (after the base weight's): every delta `scaling * B @ A`
        (and `scaling * b` of a lora_bias) is finite."""
        for name in names:
            bias_delta = self.lora_bias_delta(name)
            if not torch.isfinite(self.get_delta_weight(name)).all() \
                    or (bias_delta is not None and not torch.isfinite(bias_delta).all()):
                raise ValueError(f"merging adapter {name!r} would write non-finite values into {label}: "
                                 "its delta weight (scaling * B @ A, or scaling * b of its lora_bias) holds inf "
                                 "or nan; nothing was written")

    def _merged_bias(self, names: list[str], safe_merge: bool, label: str | None = None,
                     start: torch.Tensor | None = None) -> torch.Tensor | None:
        """The base bias (or `start`) plus `scaling * b` of every adapter in `names` with a
        lora_bias, in the bias's dtype, not written yet; None when none of them has one."""
        deltas = [d for d in (self.lora_bias_delta(n) for n in names) if d is not None]
        if not deltas:
            return None
        bias = self.base_layer.bias if start is None else start  # exists: see _check_bias_mergeable
        merged = bias.detach().to(torch.float64 if bias.dtype == torch.float64 else torch.float32)
        for delta in deltas:
            merged = merged + delta.to(merged.device, merged.dtype)
        merged = merged.to(bias.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapters {names} into {label or self._label()} would write non-finite "
                             f"values into its bias (overflow in {bias.dtype}); nothing was written")
        return merged

    def _merged_weight(self, names: list[str], safe_merge: bool, label: str | None = None) -> torch.Tensor:
        """The base weight with `names` merged in, in the weight's dtype, not written yet."""
        self.check_mergeable(names, safe_merge, label)
        weight = self.base_weight()
        merged = weight.data.to(torch.float32 if weight.dtype != torch.float64 else weight.dtype)
        for name in names:
            merged = self._apply_merge(name, merged)
        merged = merged.to(weight.dtype)  # check after the cast: float16 overflows where float32 does not
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapters {names} into {label or self._label()} would write non-finite "
                             f"values (overflow in {weight.dtype}); nothing was written")
        return merged

    def merge(self, safe_merge: bool = False, adapter_names: Iterable[str] | None = None) -> None:
        """Add `scaling * B @ A` of the active (or given) adapters into the base weight, in place.

        Idempotent: adapters already merged are skipped. Everything is checked and the sum
        computed before the weight is written; with `safe_merge=True` a non-finite base
        weight, delta or sum raises ValueError and nothing is written. A base weight tied
        to other modules (`tied_with`) is never merged into.
        """
        check_flag("safe_merge", safe_merge)
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        merged = self._merged_weight(names, safe_merge)
        bias = self._merged_bias(names, safe_merge)  # None: no adapter in `names` has a lora_bias
        weight = self.base_weight()
        if not self.merged_adapters and self.keep_premerge_weight:
            self._premerge_weight = weight.detach().clone()
            base_bias = getattr(self.base_layer, "bias", None)
            self._premerge_bias = base_bias.detach().clone() if isinstance(base_bias, torch.Tensor) else None
        weight.data.copy_(merged)
        if bias is not None:
            self.base_layer.bias.data.copy_(bias)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again: restore the kept pre-merge
        weight (bit-exact), or subtract the deltas when `keep_premerge_weight` is False.

        With nothing merged it changes nothing and warns (as PEFT does): a call without a
        matching `merge()` usually means a mix-up in the caller's bookkeeping. Idempotent.
        """
        if not self.merged_adapters:
            warnings.warn("unmerge(): no adapter is merged into this layer; nothing to do", UserWarning,
                          stacklevel=2)
            return
        if self._premerge_weight is not None:  # bit-exact: put the kept pre-merge weight (and bias) back
            weight = self.base_weight()
            weight.data.copy_(self._premerge_weight.to(weight.device))
            self._premerge_weight = None
            if self._premerge_bias is not None:
                self.base_layer.bias.data.copy_(self._premerge_bias.to(self.base_layer.bias.device))
                self._premerge_bias = None
            self.merged_adapters.clear()
            self._after_unmerge()
            return
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def _after_unmerge(self) -> None:
        """The pre-merge weight was put back: variants drop what they kept for undoing merges."""
        self._base_weight_changed()

    def _base_weight_changed(self) -> None:
        """The base weight was rewritten (not by a variant's own merge): variants drop what
        they derived from it."""
        for variant in self.lora_variant.values():
            variant.base_weight_changed()

    @classmethod
    def supports_dora(cls, base_layer: nn.Module) -> bool:
        """Whether this layer type has a DoRA variant for `base_layer` (none by default)."""
        return False

    def _unmerge_one(self, name: str) -> None:
        """Take adapter `name` out of the base weight (the last one merged comes out first)."""
        weight = self.base_weight()
        restored = weight.data.to(torch.float32 if weight.dtype != torch.float64 else weight.dtype)
        weight.data.copy_(self._undo_merge(name, restored))
        delta = self.lora_bias_delta(name)
        if delta is not None:
            bias = self.base_layer.bias
            wide = bias.data.to(torch.float32 if bias.dtype != torch.float64 else bias.dtype)
            bias.data.copy_(wide - delta.to(wide.device, wide.dtype))

    def _apply_merge(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight (float32/float64 copy) with adapter `name` merged in: `W + delta`,
        or what the adapter's variant makes of it."""
        if name in self.lora_variant:
            return self.lora_variant[name].merge(self, name, weight)
        return weight + self.get_delta_weight(name).to(weight.dtype)

    def _undo_merge(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `_apply_merge`."""
        if name in self.lora_variant:
            return self.lora_variant[name].unmerge(self, name, weight)
        return weight - self.get_delta_weight(name).to(weight.dtype)

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Iterable[str] | None = None) -> nn.Module:
        """Merge the active (or given) adapters and return the plain base layer."""
        self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.base_layer

    def _compute_dtype(self, t: torch.Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, active={self.active_adapters}, merged={self.merged_adapters}"


class LoRALinear(LoRALayer):
    """`h = base(x) + scaling * B(A(dropout(x)))` over any linear-like base layer.

    Args:
        in_features, out_features: sizes of the base `nn.Linear` created when `base_layer` is None.
        r: rank of the update (LoRA sec. 4.1).
        alpha: scaling numerator; `scaling = alpha / r` (or `alpha / sqrt(r)` with `rslora`).
        dropout: dropout probability on the adapter input only.
        bias: whether the created base `nn.Linear` has a bias.
        base_layer: wrap this layer instead of creating one (kept as is: no copy).
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D.
        init: "kaiming" (A kaiming-uniform with a = sqrt(5), the nn.Linear default) or
            "gaussian" (A normal with std 1/r); B is zero either way.
        dtype: adapter dtype (default float32, float64 for a float64 base).
        dora: make the adapter a DoRA adapter (see `enable_dora`).
        lora_bias: give `lora_B` a trainable bias b, zero at the start (PEFT's `lora_bias`):
            `h = base(x) + scaling * (B A dropout(x) + b)`; merging adds `scaling * b` to the
            base bias (a base without one cannot merge it). Not with DoRA (as PEFT).

    DoRA (Liu et al. 2024): `h = (m / ||W + s B A||_row) * (W + s B A) x + b`, with the
    norm detached from the graph (DoRA sec. 4.3) and computed without forming
    `W + s B A` (see `lora.dora`). Dropout applies to the low-rank path only:
    `h = base(x) + (m/n - 1) * (W x) + (m/n) * s * B A dropout(x)` (identical to PEFT
    without dropout; PEFT in training with dropout > 0 uses `W dropout(x)` in the middle
    term, which costs a second base matmul).

    Shapes: x (..., in_features) -> (..., out_features); output dtype = input dtype.
    """

    adapter_dict_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    add_in_place = False  # True: the base layer always returns a fresh tensor (see _can_add_in_place)

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, bias: bool = True, *, base_layer: nn.Module | None = None,
                 adapter_name: str = "default", rslora: bool = False, init: str = "kaiming",
                 fan_in_fan_out: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, dora: bool = False, lora_bias: bool = False):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_adapter_args(adapter_name, r, alpha, dropout, rslora, init, dtype)
        for name, value in (("bias", bias), ("fan_in_fan_out", fan_in_fan_out), ("dora", dora),
                            ("lora_bias", lora_bias)):
            check_flag(name, value)
        if dora and lora_bias:
            raise ValueError("lora_bias=True is not supported with dora=True (PEFT refuses it too)")
        if base_layer is None:
            base_layer = nn.Linear(in_features, out_features, bias=bias, device=_check_device(device))
        else:
            _check_base_shape(base_layer, in_features, out_features, fan_in_fan_out)
        super().__init__(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (their m, see lora/variants.py)
        self.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init, dtype=dtype,
                         lora_bias=lora_bias)
        if dora:
            self.enable_dora(adapter_name)

    @classmethod
    def from_layer(cls, base_layer: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                   adapter_name: str = "default", rslora: bool = False, init: str = "kaiming",
                   fan_in_fan_out: bool | None = None, dtype: torch.dtype | None = None,
                   dora: bool = False, lora_bias: bool = False) -> "LoRALinear":
        """Wrap an existing linear-like layer (nn.Linear, GPT-2 Conv1D, or anything with
        `in_features` / `out_features`). The base weight object is kept, not copied."""
        if isinstance(base_layer, LoRALayer):
            raise ValueError("base_layer is already a LoRA layer; add another adapter with add_adapter() instead")
        if fan_in_fan_out is not None:
            check_flag("fan_in_fan_out", fan_in_fan_out)
        if _is_conv1d(base_layer):
            in_features, out_features = base_layer.weight.shape  # Conv1D stores (in, out)
            if fan_in_fan_out is False:
                warnings.warn("fan_in_fan_out=False for a Conv1D base; using True", stacklevel=2)
            fan_in_fan_out = True
        elif hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):
            in_features, out_features = base_layer.in_features, base_layer.out_features
            if isinstance(base_layer, nn.Linear) and fan_in_fan_out:
                warnings.warn("fan_in_fan_out=True for an nn.Linear base (weight is (out, in)); using False",
                              stacklevel=2)
                fan_in_fan_out = False
        else:
            raise TypeError(f"base_layer must be linear-like (in_features/out_features or Conv1D), "
                            f"got {type(base_layer).__name__}")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"base_layer: {type(base_layer).__name__} has {name}={value!r}; it must be a "
                                 "positive int (a lazy module must run one forward pass first)")
        return cls(in_features, out_features, r=r, alpha=alpha, dropout=dropout, base_layer=base_layer,
                   adapter_name=adapter_name, rslora=rslora, init=init,
                   fan_in_fan_out=bool(fan_in_fan_out), dtype=dtype, dora=dora, lora_bias=lora_bias)

    from_linear = from_layer

    def _create_adapter(self, name, r, dropout, device, dtype):
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, init: str = "kaiming") -> None:
        """A: kaiming-uniform with a = sqrt(5) (as nn.Linear; PEFT's default) or normal with std 1/r
        (PEFT's "gaussian"); B: zeros. "pissa[_niter_K]" / "olora" set A and B from the base
        weight and rewrite it (see `init_from_weight`)."""
        self._check_known(adapter_name)
        check_init(init)
        if rewrites_base(init):
            self.init_from_weight(adapter_name, init)
            return
        self.init_factors(adapter_name, init)

    def check_init_allowed(self, init: str, r: int) -> None:
        """PiSSA / OLoRA need a float base weight, no adapter yet (see `_check_rewrite_allowed`) and
        r <= min(in, out). LoftQ replaces the layer's base by a 4-bit one, which a dense layer
        cannot hold: it goes through `apply_lora` or `QLoRALinear.from_loftq`."""
        if not rewrites_base(init):
            return
        if init == "loftq":
            raise ValueError("init='loftq' replaces the base by a 4-bit LoftQ weight, which a LoRALinear cannot "
                             "hold; use apply_lora(model, LoRAConfig(init='loftq', ...)) on the dense model or "
                             "QLoRALinear.from_loftq(linear, ...)")
        self._check_rewrite_allowed(init)
        check_init_rank(r, (self.out_features, self.in_features))
        self._init_source_weight()  # a base without a float weight fails here, before anything is added

    def _init_source_weight(self) -> torch.Tensor:
        """The weight an init factors, (out, in), detached."""
        try:
            return self.weight_out_in()
        except TypeError as err:
            raise TypeError(f"init needs a float base weight: {err}") from None

    @torch.no_grad()
    def _write_base_weight(self, adapter_name: str, weight: torch.Tensor) -> None:
        """Replace the base weight by `weight` (out, in), in the base's dtype and layout."""
        base = self.base_weight()
        base.data.copy_(weight.T if self.fan_in_fan_out else weight)

    @torch.no_grad()
    def init_from_weight(self, adapter_name: str, init: str) -> None:
        """PiSSA or OLoRA (lora/init.py) for adapter `adapter_name`: A and B from the base weight W,
        and the base replaced by `W - scaling * B @ A`, so the layer's output is unchanged (up to
        the base dtype's rounding). The starting (A0, B0) are kept in `initial_factors`.
        `pissa_niter_K` draws its sketch from torch's global generator (seed it for determinism)."""
        self._check_known(adapter_name)
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        W = self._init_source_weight()
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        if init_kind(init) == "pissa":
            result = pissa(W, r, pissa_niter(init), scaling=scaling, dtype=A.dtype)
        else:
            result = olora(W, r, scaling=scaling, dtype=A.dtype)
        A.copy_(result.A)
        B.copy_(result.B)
        self._write_base_weight(adapter_name, result.base)
        self._base_weight_changed()
        self.initial_factors[adapter_name] = (A.detach().clone(), B.detach().clone())

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`scaling * B @ A`, shaped like the base weight ((out, in), or (in, out) with fan_in_fan_out).

        For a DoRA adapter this is the low-rank part only; merging also rescales the rows."""
        self._check_known(adapter_name)
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        dt = self._compute_dtype(A)
        delta = (B.to(dt) @ A.to(dt)) * self.scaling[adapter_name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def add_adapter(self, adapter_name: str = "default", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    rslora: bool = False, init: str = "kaiming", dtype: torch.dtype | None = None,
                    activate: bool | None = None, dora: bool = False, lora_bias: bool = False) -> None:
        """As `LoRALayer.add_adapter`; `dora=True` makes it a DoRA adapter (`enable_dora`)."""
        check_flag("dora", dora)
        check_flag("lora_bias", lora_bias)
        if dora and lora_bias:
            raise ValueError("lora_bias=True is not supported with dora=True (PEFT refuses it too)")
        if dora:
            self.weight_out_in()  # a base without a float weight fails before anything is added
        super().add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init,
                            dtype=dtype, activate=activate, lora_bias=lora_bias)
        if dora:
            self.enable_dora(adapter_name)

    @classmethod
    def supports_lora_bias(cls, base_layer: nn.Module) -> bool:
        """Any linear-like base (dense, Conv1D or 4-bit): `lora_B` is an `nn.Linear`."""
        return True

    # ----- DoRA (a variant: lora/variants.py) -----
    @classmethod
    def supports_dora(cls, base_layer: nn.Module) -> bool:
        """A dense float weight to take row norms of: nn.Linear, Conv1D (not embeddings, not 4-bit)."""
        weight = getattr(base_layer, "weight", None)
        return not isinstance(base_layer, nn.Embedding) and isinstance(weight, torch.Tensor) \
            and weight.is_floating_point()

    def is_dora(self, adapter_name: str) -> bool:
        return isinstance(self.lora_variant.get(adapter_name), DoraLinearVariant)

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as (out, in), detached (a view, no copy)."""
        try:
            weight = self.base_weight()
        except TypeError as err:
            raise TypeError(f"DoRA needs a dense float base weight: {err} (4-bit bases are not supported "
                            "with dora=True; merge_and_unload() the base to a dense layer first)") from None
        weight = weight.detach()
        return weight.T if self.fan_in_fan_out else weight

    def enable_dora(self, adapter_name: str) -> None:
        """Turn adapter `adapter_name` into a DoRA adapter: m = ||W + s B A||_row (DoRA sec. 4.1;
        `||W||_row` for a fresh adapter, so the layer still equals its base)."""
        self._check_variant_allowed(adapter_name)
        if self.lora_bias_of(adapter_name) is not None:
            raise ValueError(f"adapter {adapter_name!r} has lora_bias=True, which DoRA does not support (as PEFT)")
        self.weight_out_in()  # a base without a float weight fails before anything changes
        self._install_variant(adapter_name, DoraLinearVariant())

    def row_norm(self, adapter_name: str) -> torch.Tensor:
        """`||W + s B A||_row` (out,) of one adapter, computed without forming `W + s B A`
        (`lora.dora`; a DoRA adapter's variant caches `||W||_row^2`)."""
        variant = self.lora_variant.get(adapter_name)
        return (variant if isinstance(variant, DoraLinearVariant) else DoraLinearVariant()).row_norm(self, adapter_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension in_features={self.in_features}, got shape {tuple(x.shape)}")
        if self.disabled and self.merged:
            self.unmerge()
        if self.row_adapters is not None or "adapter_names" in kwargs:  # one adapter per row (lora/mixed_batch.py)
            with_bias = [n for n in self.r if self.lora_bias_of(n) is not None]
            if with_bias:
                raise ValueError(f"{self._label()}: adapters {with_bias} have lora_bias=True, which mixed-batch "
                                 "inference (one adapter per row) does not support; run them one at a time")
            from .row_batch import linear_forward
            return linear_forward(self, x, *args, **kwargs)
        if self.disabled or self.merged or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        x2d = x.reshape(-1, x.shape[-1])  # (N, in): 2-D, so the output can be updated without views
        result = self.base_layer(x2d, *args, **kwargs)  # (N, out)
        if any(name in self.lora_variant for name in self.active_adapters):
            result = self._add_updates(x2d, result, self._lora_update)
            return result.view(*x.shape[:-1], result.shape[-1])  # (..., out)
        for name in self.active_adapters:
            A, B = self.lora_A[name], self.lora_B[name]
            if B.bias is not None:  # lora_bias: PEFT's `B(A(x)) * scaling`, the bias scaled too
                result = result + self._lora_update(name, x2d).to(result.dtype)
                continue
            # Scale the thin (N, r) tensor rather than the (N, out) one: same math, less traffic.
            h = A(self.lora_dropout[name](x2d.to(A.weight.dtype))) * self.scaling[name]  # (N, r)
            if h.dtype != result.dtype or h.dtype != B.weight.dtype:
                # float32 adapters over a bfloat16 base, or autocast (which casts B(h) for us but
                # not the in-place addmm_ below)
                result = result + B(h).to(result.dtype)
            elif self._can_add_in_place(result):
                # result += h @ B^T in place: on the CPU a fresh (N, out) tensor costs more
                # (allocation, page faults) than the rank-r matmul itself.
                result = result.addmm_(h, B.weight.t())
            else:
                result = torch.addmm(result, h, B.weight.t())
        return result.view(*x.shape[:-1], result.shape[-1])  # (..., out)

    def _lora_update(self, name: str, x2d: torch.Tensor) -> torch.Tensor:
        """`scaling * (B A dropout(x) + b)` (N, out) of one plain adapter (b: its lora_bias, if any)."""
        A, B = self.lora_A[name], self.lora_B[name]
        h = A(self.lora_dropout[name](x2d.to(A.weight.dtype)))  # (N, r)
        if B.bias is None:  # scale the thin (N, r) tensor: same math, less traffic
            return B(h * self.scaling[name])
        return B(h) * self.scaling[name]

    row_path_forward = forward  # this forward has the per-row branch (lora/row_batch.py's check)

    def _can_add_in_place(self, result: torch.Tensor) -> bool:
        """Whether the base output may be updated in place: it must be a fresh tensor, which
        holds for `nn.Linear` (set `add_in_place = True` on a subclass whose base also returns
        fresh outputs; autograd raises if the base saved its output for backward). Views
        are excluded: autograd would copy the whole gradient to undo them."""
        if torch.compiler.is_compiling():  # the compiler plans its own buffers (and cannot trace _is_view)
            return False
        fresh = self.add_in_place or type(self.base_layer) is nn.Linear
        return fresh and not result._is_view() and not (result.is_leaf and result.requires_grad)


class LoRAEmbedding(LoRALayer):
    """LoRA for `nn.Embedding`: `E[x] + scaling * (A^T[x]) @ B^T` with A (r, num_embeddings)
    zero-initialised and B (embedding_dim, r) normal, as the LoRA reference code does
    (loralib `Embedding.reset_parameters`). `init` is accepted for symmetry; both modes
    use that scheme. Parameters live in `lora_embedding_A` / `lora_embedding_B`
    (`nn.ParameterDict`, PEFT's names).

    `dora=True` (or `enable_dora`) makes an adapter a DoRA adapter in PEFT's parameterisation
    (`lora.variants.DoraEmbeddingVariant`: one magnitude per embedding dimension)."""

    adapter_dict_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    takes_dropout = False

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 8, alpha: float = 16, *,
                 base_layer: nn.Embedding | None = None, adapter_name: str = "default",
                 rslora: bool = False, init: str = "kaiming", dtype: torch.dtype | None = None,
                 padding_idx: int | None = None, dora: bool = False):
        check_adapter_args(adapter_name, r, alpha, 0.0, rslora, init, dtype)
        check_flag("dora", dora)
        if rewrites_base(init):
            raise ValueError(f"init={init!r} is not supported by LoRAEmbedding (it rewrites a linear layer's "
                             "weight from its SVD/QR); use init='kaiming' or 'gaussian'")
        if base_layer is None:
            for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ValueError(f"{name} must be a positive int, got {value!r}")
            if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)
                                            or not -num_embeddings <= padding_idx < num_embeddings):
                raise ValueError(f"padding_idx must be None or an int in [-{num_embeddings}, {num_embeddings}), "
                                 f"got {padding_idx!r}")
            base_layer = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"base_layer must be nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.in_features, self.out_features = self.num_embeddings, self.embedding_dim  # PEFT's names
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.add_adapter(adapter_name, r=r, alpha=alpha, rslora=rslora, init=init, dtype=dtype)
        if dora:
            self.enable_dora(adapter_name)

    @classmethod
    def from_layer(cls, base_layer: nn.Embedding, r: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                   adapter_name: str = "default", rslora: bool = False, init: str = "kaiming",
                   fan_in_fan_out: bool | None = None, dtype: torch.dtype | None = None,
                   dora: bool = False) -> "LoRAEmbedding":
        """Wrap an `nn.Embedding` (kept, not copied). `dropout` must be 0: there is no
        dropout on token ids."""
        if isinstance(base_layer, LoRALayer):
            raise ValueError("base_layer is already a LoRA layer; add another adapter with add_adapter() instead")
        check_dropout(dropout)
        if dropout:
            warnings.warn("dropout is ignored by LoRAEmbedding", stacklevel=2)
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"base_layer must be nn.Embedding, got {type(base_layer).__name__}")
        return cls(base_layer.num_embeddings, base_layer.embedding_dim, r=r, alpha=alpha, base_layer=base_layer,
                   adapter_name=adapter_name, rslora=rslora, init=init, dtype=dtype, dora=dora)

    def _create_adapter(self, name, r, dropout, device, dtype):
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.embedding_dim, r, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, init: str = "kaiming") -> None:
        self._check_known(adapter_name)
        check_choice("init", init, INIT_MODES)  # PiSSA / OLoRA / LoftQ are refused by check_init_allowed
        nn.init.zeros_(self.lora_embedding_A[adapter_name])
        nn.init.normal_(self.lora_embedding_B[adapter_name])

    def _check_ids(self, x) -> None:
        """Token ids: an integer tensor in [0, num_embeddings). The range is checked in eager
        mode on the CPU only (cheap there; on a GPU it would cost a synchronisation per call)."""
        if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a tensor of integer token ids, got {got}")
        if torch.compiler.is_compiling() or x.device.type != "cpu" or not x.numel():
            return  # a data-dependent check would break the graph / synchronise the GPU
        if int(x.min()) < 0 or int(x.max()) >= self.num_embeddings:
            raise ValueError(f"x holds token ids outside [0, {self.num_embeddings}) (num_embeddings): "
                             f"min {int(x.min())}, max {int(x.max())}")

    def add_adapter(self, adapter_name: str = "default", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    rslora: bool = False, init: str = "kaiming", dtype: torch.dtype | None = None,
                    activate: bool | None = None, dora: bool = False) -> None:
        """As `LoRALayer.add_adapter`; `dora=True` makes it a DoRA adapter (`enable_dora`)."""
        check_flag("dora", dora)
        super().add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init,
                            dtype=dtype, activate=activate)
        if dora:
            self.enable_dora(adapter_name)

    # ----- DoRA (a variant: lora/variants.py) -----
    @classmethod
    def supports_dora(cls, base_layer: nn.Module) -> bool:
        """PEFT's embedding DoRA: one magnitude per embedding dimension of a float table."""
        weight = getattr(base_layer, "weight", None)
        return isinstance(base_layer, nn.Embedding) and isinstance(weight, torch.Tensor) \
            and weight.is_floating_point()

    def is_dora(self, adapter_name: str) -> bool:
        return isinstance(self.lora_variant.get(adapter_name), DoraEmbeddingVariant)

    def weight_out_in(self) -> torch.Tensor:
        """The table as the weight of a linear map from one-hot ids: E^T (dim, num), detached."""
        return self.base_weight().detach().T

    def enable_dora(self, adapter_name: str) -> None:
        """Turn adapter `adapter_name` into a DoRA adapter: m = ||E + s (B A)^T|| per embedding
        dimension (over all tokens), so a fresh adapter leaves the layer unchanged."""
        self._check_variant_allowed(adapter_name)
        self.base_weight()  # a base without a float weight fails before anything changes
        self._install_variant(adapter_name, DoraEmbeddingVariant())

    def embed(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """`F.embedding` of ids `x` in `table` with the base layer's options (padding_idx, max_norm, ...)."""
        base = self.base_layer
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`scaling * (B @ A)^T`, shaped (num_embeddings, embedding_dim) like the base weight."""
        self._check_known(adapter_name)
        A = self.lora_embedding_A[adapter_name]
        B = self.lora_embedding_B[adapter_name]
        dt = self._compute_dtype(A)
        return (B.to(dt) @ A.to(dt)).T * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_ids(x)
        if self.disabled and self.merged:
            self.unmerge()
        if self.row_adapters is not None:  # one adapter per row (lora/mixed_batch.py)
            from .row_batch import embedding_forward
            return embedding_forward(self, x)
        result = self.base_layer(x)
        if self.disabled or self.merged:
            return result
        return self._add_updates(x, result, self._embedding_update)

    def _embedding_update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The plain LoRA update of adapter `name`: `scaling * A^T[x] @ B^T`, (..., embedding_dim)."""
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        h = self.embed(x, A.T)  # (..., r)
        return (h * self.scaling[name]) @ B.T

    row_path_forward = forward  # this forward has the per-row branch (lora/row_batch.py's check)
