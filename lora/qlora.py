"""`QLoRALinear`: LoRA adapters over a frozen 4-bit `quant.LinearNF4` base (QLoRA, Dettmers et al. 2023).

`h = dequant(W_nf4) x + b + scaling * B A x`. Only A and B train; gradients reach them
through the 4-bit base, which dequantizes W again in backward instead of storing it
(QLoRA sec. 3). Adapters live in the base layer's compute dtype unless `dtype` is given.

Merging into a 4-bit weight cannot be exact: `merge()` dequantizes W, adds
`scaling * B @ A` and re-quantizes (as PEFT does for bitsandbytes layers), so the merged
layer differs from the unmerged one by a re-quantization error of the order of the NF4
error itself (relative RMSE up to ~0.1 of W for Gaussian weights). The error of each merge
is kept in `merge_errors`. `merge_and_unload()` avoids it by returning a dense layer;
`merge_and_unload(requantize=True)` returns a `LinearNF4` and reports the error.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

import kernels  # noqa: F401  (registers the Triton path of LinearNF4 for CUDA inputs)
from quant import LinearNF4

from .inject import register_lora_layer
from .layer import LoRALinear

logger = logging.getLogger(__name__)


def relative_rmse(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """`||approx - exact|| / ||exact||` in float64 (0 when both are zero)."""
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
        if base_layer is None:
            base_layer = LinearNF4(in_features, out_features, bias=bias, quant_type=quant_type,
                                   blocksize=blocksize, double_quant=double_quant,
                                   compute_dtype=compute_dtype, device=kwargs.get("device"))
        if not isinstance(base_layer, LinearNF4):
            raise TypeError(f"base_layer must be a quant.LinearNF4, got {type(base_layer).__name__}")
        self.merge_errors: dict[str, float] = {}
        super().__init__(in_features, out_features, r=r, alpha=alpha, dropout=dropout, bias=bias,
                         base_layer=base_layer, **kwargs)

    @classmethod
    def from_layer(cls, base_layer: LinearNF4, r: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                   adapter_name: str = "default", rslora: bool = False, init: str = "kaiming",
                   fan_in_fan_out: bool | None = None, dtype: torch.dtype | None = None) -> "QLoRALinear":
        """Wrap an existing `LinearNF4` (kept, not copied)."""
        if not isinstance(base_layer, LinearNF4):
            raise TypeError(f"base_layer must be a quant.LinearNF4, got {type(base_layer).__name__}")
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

    # ----- merge: dequantize, add, re-quantize -----
    def _merged_weight(self, names: Iterable[str], sign: float = 1.0) -> torch.Tensor:
        """float32 `W + sign * sum(scaling * B @ A)` over `names`, W dequantized."""
        weight = self.base_layer.dequantize(torch.float32)  # (out, in)
        for name in names:
            weight = weight + sign * self.get_delta_weight(name).to(torch.float32)
        return weight

    def merge(self, safe_merge: bool = False, adapter_names: Iterable[str] | None = None) -> None:
        """Add the adapters into the 4-bit base: dequantize, add `scaling * B @ A`, re-quantize.

        The re-quantization error (relative RMSE against the exact sum) is stored in
        `merge_errors[name]` and logged. With `safe_merge=True` a non-finite sum raises
        ValueError before anything is written.
        """
        for name in self._adapters_to_merge(adapter_names):
            exact = self._merged_weight([name])
            if safe_merge and not torch.isfinite(exact).all():
                raise ValueError(f"merging adapter {name!r} would write non-finite values into the base weight; "
                                 "nothing was written")
            self.base_layer.set_weight(exact)
            self.merge_errors[name] = relative_rmse(self.base_layer.dequantize(torch.float32), exact)
            logger.info("merged adapter %r into a 4-bit base: re-quantization error %.4g (relative RMSE)",
                        name, self.merge_errors[name])
            self.merged_adapters.append(name)

    def _unmerge_one(self, name: str) -> None:
        """Subtract adapter `name` again and re-quantize (not exact: see the module docstring)."""
        self.base_layer.set_weight(self._merged_weight([name], sign=-1.0))

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Iterable[str] | None = None,
                         requantize: bool = False) -> nn.Module:
        """A plain layer with the adapters merged, the 4-bit base left as it was.

        Args:
            safe_merge: raise ValueError instead of producing non-finite weights.
            adapter_names: adapters to merge (default: the active ones).
            requantize: False returns an `nn.Linear` in the compute dtype (no extra error
                beyond that dtype's rounding); True returns a `LinearNF4` holding the
                re-quantized sum, with the added error in its `requantization_error`
                attribute (relative RMSE against the exact float32 sum), also logged.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.r]
        if unknown:
            raise ValueError(f"adapter_names: {unknown} not found; this layer has {self.adapter_names}")
        exact = self._merged_weight([n for n in names if n not in self.merged_adapters])
        if safe_merge and not torch.isfinite(exact).all():
            raise ValueError("merging would produce non-finite weights; nothing was returned")
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
