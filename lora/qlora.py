"""`QLoRALinear`: LoRA adapters over a frozen 4-bit `quant.LinearNF4` base (QLoRA, Dettmers et al. 2023).

`h = dequant(W_nf4) x + b + scaling * B A x`. Only A and B train; gradients reach them
through the 4-bit base, which dequantizes W again in backward instead of storing it
(QLoRA sec. 3). Adapters live in the base layer's compute dtype unless `dtype` is given.

Merging into a 4-bit weight cannot be exact: `merge()` dequantizes W, adds
`scaling * B @ A` and re-quantizes (as PEFT does for bitsandbytes layers), so the merged
layer differs from the unmerged one by a re-quantization error of the order of the NF4
error itself (relative RMSE up to ~0.1 of W for Gaussian weights). The error of each merge
is kept in `merge_errors`. The pre-merge 4-bit codes and absmax are kept while merged and
`unmerge()` restores them bit-exact, so merge/unmerge cycles (`disable_adapters` blocks)
do not accumulate errors. `merge_and_unload()` avoids the error by returning a dense
layer; `merge_and_unload(requantize=True)` returns a `LinearNF4` and reports the error.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Iterable

import torch
from torch import nn

import kernels  # noqa: F401  (registers the Triton path of LinearNF4 for CUDA inputs)
from quant import LinearNF4, dequantize_4bit

from .inject import register_lora_layer
from .layer import LoRALinear, check_adapter_args, check_bool

logger = logging.getLogger(__name__)


def relative_rmse(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """`||approx - exact|| / ||exact||` in float64 (0 when both are zero)."""
    for name, t in (("approx", approx), ("exact", exact)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if approx.shape != exact.shape:
        raise ValueError(f"approx and exact must have the same shape, got {tuple(approx.shape)} and {tuple(exact.shape)}")
    exact64 = exact.double()
    den = exact64.norm().item()
    num = (approx.double() - exact64).norm().item()
    return num / den if den > 0 else num


class QLoRALinear(LoRALinear):
    """LoRA over a `LinearNF4` base.

    Args:
        in_features, out_features, r, alpha, dropout, bias: as `LoRALinear`.
        base_layer: an existing `LinearNF4`; when None one is created with
            `quant_type`, `blocksize`, `double_quant` and `compute_dtype`.
        dtype: adapter dtype; default the base layer's `compute_dtype` (bfloat16 unless chosen).
        Other keyword arguments go to `LoRALinear`.

    Shapes: x (..., in_features) -> (..., out_features), in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, bias: bool = True, *, base_layer: LinearNF4 | None = None,
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, **kwargs):
        check_adapter_args(kwargs.get("adapter_name", "default"), r, alpha, dropout, kwargs.get("rslora", False),
                           kwargs.get("init", "kaiming"), kwargs.get("dtype"))
        if base_layer is None:
            base_layer = LinearNF4(in_features, out_features, bias=bias, quant_type=quant_type,
                                   blocksize=blocksize, double_quant=double_quant,
                                   compute_dtype=compute_dtype, device=kwargs.get("device"))
        if not isinstance(base_layer, LinearNF4):
            raise TypeError(f"base_layer must be a quant.LinearNF4, got {type(base_layer).__name__}")
        self.merge_errors: dict[str, float] = {}
        self._premerge: dict[str, torch.Tensor] | None = None  # 4-bit buffers from before the first merge
        super().__init__(in_features, out_features, r=r, alpha=alpha, dropout=dropout, bias=bias,
                         base_layer=base_layer, **kwargs)

    @classmethod
    def from_layer(cls, base_layer: LinearNF4, r: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                   adapter_name: str = "default", rslora: bool = False, init: str = "kaiming",
                   fan_in_fan_out: bool | None = None, dtype: torch.dtype | None = None) -> "QLoRALinear":
        """Wrap an existing `LinearNF4` (kept, not copied)."""
        if not isinstance(base_layer, LinearNF4):
            raise TypeError(f"base_layer must be a quant.LinearNF4, got {type(base_layer).__name__}")
        check_adapter_args(adapter_name, r, alpha, dropout, rslora, init, dtype)
        if fan_in_fan_out:
            raise ValueError("fan_in_fan_out must be False for a LinearNF4 base (its weight is (out, in))")
        return cls(base_layer.in_features, base_layer.out_features, r=r, alpha=alpha, dropout=dropout,
                   base_layer=base_layer, adapter_name=adapter_name, rslora=rslora, init=init, dtype=dtype)

    from_linear = from_layer

    def add_adapter(self, adapter_name: str = "default", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    rslora: bool = False, init: str = "kaiming", dtype: torch.dtype | None = None,
                    activate: bool | None = None) -> None:
        """As `LoRALinear.add_adapter`; the default adapter dtype is the base's compute dtype."""
        super().add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init,
                            dtype=dtype or self.base_layer.compute_dtype, activate=activate)

    # ----- merge: from the kept 4-bit original, add, re-quantize -----
    def _packed_state(self) -> dict[str, torch.Tensor]:
        """Copies of the base's 4-bit buffers (codes, absmax, nested absmax, offset): ~4.1 bits a weight."""
        keys = ("weight_packed", "absmax") + (("offset", "nested_absmax") if self.base_layer.double_quant else ())
        return {k: getattr(self.base_layer, k).detach().clone() for k in keys}

    def _original_weight(self) -> torch.Tensor:
        """float32 (out, in): the dequantized weight from before the first merge."""
        if self._premerge is None:
            return self.base_layer.dequantize(torch.float32)
        saved = {k: t.to(self.base_layer.weight_packed.device) for k, t in self._premerge.items()}
        state = dataclasses.replace(self.base_layer.quant_state, absmax=saved["absmax"],
                                    offset=saved.get("offset"), nested_absmax=saved.get("nested_absmax"))
        return dequantize_4bit(saved["weight_packed"], state, dtype=torch.float32)

    def _merged_weight(self, names: Iterable[str], safe_merge: bool = False, label: str | None = None) -> torch.Tensor:
        """float32 `W0 + sum(scaling * B @ A)` over the merged adapters and `names`, with W0 the
        pre-merge 4-bit weight dequantized; with `safe_merge` non-finite parts raise ValueError."""
        names = list(dict.fromkeys([*self.merged_adapters, *names]))
        self.check_mergeable(names, safe_merge, label)
        weight = self._original_weight()  # (out, in)
        for name in names:
            weight = weight + self.get_delta_weight(name).to(torch.float32)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"merging adapters {names} into {label or self._label()} would write non-finite "
                             "values; nothing was written")
        return weight

    def check_mergeable(self, names: list[str], safe_merge: bool, label: str | None = None) -> None:
        """As `LoRALinear.check_mergeable`, for the dequantized 4-bit base (never tied)."""
        label = label or self._label()
        if self.base_layer.weight_packed.is_meta:
            raise ValueError(f"cannot merge into {label}: its base weight is on the meta device (no data)")
        if not safe_merge:
            return
        if not torch.isfinite(self._original_weight()).all():
            raise ValueError(f"base weight of {label} is not finite (its 4-bit absmax holds inf or nan, "
                             "before any adapter); nothing was written")
        for name in names:
            if not torch.isfinite(self.get_delta_weight(name)).all():
                raise ValueError(f"merging adapter {name!r} would write non-finite values into {label}: "
                                 "its delta weight (scaling * B @ A) holds inf or nan; nothing was written")

    def merge(self, safe_merge: bool = False, adapter_names: Iterable[str] | None = None) -> None:
        """Add the adapters into the 4-bit base: dequantize, add `scaling * B @ A`, re-quantize.

        The 4-bit weight from before the first merge is kept (a copy of its codes and
        absmax, ~4.1 bits a weight), and every merge re-quantizes `W0 + all merged deltas`
        from it: merging adapters one by one or together gives the same weight, and
        `unmerge()` puts the kept codes back bit-exact, so merge/unmerge cycles (e.g.
        `disable_adapters` blocks) never add up re-quantization errors. The error of the
        re-quantization (relative RMSE against the exact sum) is stored in
        `merge_errors[name]` and logged. With `safe_merge=True` a non-finite base, delta
        or sum raises ValueError before anything is written.
        """
        check_bool("safe_merge", safe_merge)
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        exact = self._merged_weight(names, safe_merge)
        if self._premerge is None:
            self._premerge = self._packed_state()
        self.base_layer.set_weight(exact)
        error = relative_rmse(self.base_layer.dequantize(torch.float32), exact)
        for name in names:
            self.merge_errors[name] = error
            logger.info("merged adapter %r into a 4-bit base: re-quantization error %.4g (relative RMSE)",
                        name, error)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Put the kept pre-merge 4-bit weight back, bit-exact, and mark no adapter merged.

        There is no partial unmerge: taking one of several merged adapters out would mean
        re-quantizing the others; call `unmerge()` then `merge(adapter_names=[...])`.
        With nothing merged it warns and changes nothing (as `LoRALayer.unmerge`)."""
        if not self.merged_adapters:
            warnings.warn("unmerge(): no adapter is merged into this layer; nothing to do", UserWarning,
                          stacklevel=2)
            return
        device = self.base_layer.weight_packed.device
        for key, tensor in self._premerge.items():
            setattr(self.base_layer, key, tensor.to(device))
        self._premerge = None
        self.merged_adapters.clear()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Iterable[str] | None = None,
                         requantize: bool = False) -> nn.Module:
        """A plain layer with the adapters merged, the 4-bit base left as it was.

        Args:
            safe_merge: raise ValueError instead of producing non-finite weights.
            adapter_names: adapters to merge (default: the active ones), on top of those
                already merged.
            requantize: False returns an `nn.Linear` in the compute dtype (no extra error
                beyond that dtype's rounding); True returns a `LinearNF4` holding the
                re-quantized sum, with the added error in its `requantization_error`
                attribute (relative RMSE against the exact float32 sum), also logged.
        """
        check_bool("requantize", requantize)
        check_bool("safe_merge", safe_merge)
        exact = self._merged_weight(self._adapters_to_merge(adapter_names), safe_merge)
        base = self.base_layer
        if requantize:
            layer = LinearNF4(base.in_features, base.out_features, bias=base.bias is not None,
                              weight=exact.to(base.weight_dtype), quant_type=base.quant_type,
                              blocksize=base.blocksize, double_quant=base.double_quant,
                              compute_dtype=base.compute_dtype)
            layer.requantization_error = relative_rmse(layer.dequantize(torch.float32), exact)
            logger.info("merge_and_unload(requantize=True): re-quantization error %.4g (relative RMSE)",
                        layer.requantization_error)
        else:
            layer = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                              device=exact.device, dtype=base.compute_dtype)
            layer.weight.data.copy_(exact)
        if base.bias is not None:
            layer.bias.data.copy_(base.bias.detach())
        layer.requires_grad_(False)
        return layer


register_lora_layer(LinearNF4, QLoRALinear)
