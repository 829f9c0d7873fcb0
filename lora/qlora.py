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

import loralab_kernels  # noqa: F401  (registers the Triton kernels of the loralab 4-bit ops for CUDA)
from quant import LinearNF4, dequantize_4bit

from .config import scaling_for
from .init import check_init_rank, check_loftq_bits_supported, check_loftq_iter, loftq
from .layer import LoRALinear, check_adapter_args, check_flag
from .registry import register_lora_layer

FLOAT_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what a LinearNF4 can be quantized from

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
        self.init_errors: dict[str, float] = {}  # PiSSA/OLoRA on a 4-bit base: re-quantization error of the residual
        self._premerge: dict[str, torch.Tensor] | None = None  # 4-bit buffers from before the first merge
        self._premerge_bias: torch.Tensor | None = None  # and the bias (changed by merging a lora_bias)
        super().__init__(in_features, out_features, r=r, alpha=alpha, dropout=dropout, bias=bias,
                         base_layer=base_layer, **kwargs)

    @classmethod
    def from_layer(cls, base_layer: LinearNF4, r: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                   adapter_name: str = "default", rslora: bool = False, init: str = "kaiming",
                   fan_in_fan_out: bool | None = None, dtype: torch.dtype | None = None,
                   lora_bias: bool = False) -> "QLoRALinear":
        """Wrap an existing `LinearNF4` (kept, not copied)."""
        if not isinstance(base_layer, LinearNF4):
            raise TypeError(f"base_layer must be a quant.LinearNF4, got {type(base_layer).__name__}")
        check_adapter_args(adapter_name, r, alpha, dropout, rslora, init, dtype)
        if fan_in_fan_out:
            raise ValueError("fan_in_fan_out must be False for a LinearNF4 base (its weight is (out, in))")
        return cls(base_layer.in_features, base_layer.out_features, r=r, alpha=alpha, dropout=dropout,
                   base_layer=base_layer, adapter_name=adapter_name, rslora=rslora, init=init, dtype=dtype,
                   lora_bias=lora_bias)

    from_linear = from_layer

    def add_adapter(self, adapter_name: str = "default", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    rslora: bool = False, init: str = "kaiming", dtype: torch.dtype | None = None,
                    activate: bool | None = None, lora_bias: bool = False) -> None:
        """As `LoRALinear.add_adapter`; the default adapter dtype is the base's compute dtype."""
        super().add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init,
                            dtype=dtype or self.base_layer.compute_dtype, activate=activate, lora_bias=lora_bias)

    # ----- inits that rewrite the base -----
    def check_init_allowed(self, init: str, r: int) -> None:
        """PiSSA / OLoRA on a 4-bit base (QPiSSA, PiSSA sec. 5): the dequantized weight is factored
        and the residual re-quantized (lossy: see `init_errors`). LoftQ needs the full-precision
        weight, which a 4-bit layer no longer has: use `from_loftq` on the `nn.Linear`."""
        if init == "loftq":
            raise ValueError("init='loftq' needs the full-precision weight, which a 4-bit base no longer has; "
                             "use QLoRALinear.from_loftq(linear, ...) or apply_lora(..., init='loftq') on the "
                             "dense (unquantized) model")
        super().check_init_allowed(init, r)

    def _init_source_weight(self) -> torch.Tensor:
        return self.base_layer.dequantize(torch.float32)  # (out, in)

    @torch.no_grad()
    def _write_base_weight(self, adapter_name: str, weight: torch.Tensor) -> None:
        """Re-quantize the residual into the 4-bit base (QPiSSA); the relative RMSE of that
        re-quantization goes to `init_errors[adapter_name]`, with a warning: the layer's output
        after init differs from before by it (PEFT warns the same for PiSSA on quantized bases)."""
        self.base_layer.set_weight(weight.to(torch.float32))
        error = relative_rmse(self.base_layer.dequantize(torch.float32), weight)
        self.init_errors[adapter_name] = error
        warnings.warn("PiSSA/OLoRA on a 4-bit base re-quantizes the residual W - s*B@A: the output after init "
                      "differs from the quantized model's by that re-quantization (relative RMSE in "
                      "layer.init_errors). For an exact start, initialize the dense model and quantize after.",
                      UserWarning, stacklevel=2)

    @classmethod
    @torch.no_grad()
    def from_loftq(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                   adapter_name: str = "default", rslora: bool = False, loftq_bits: int = 4, loftq_iter: int = 1,
                   compute_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None,
                   blocksize: int = 64, double_quant: bool = True) -> "QLoRALinear":
        """A QLoRALinear started by LoftQ (Li et al. 2023, Algorithm 1) from a dense `nn.Linear`
        (left untouched): the 4-bit base holds Q and the adapter A, B, with
        `dequant(Q) + scaling * B @ A ~ W` (`lora.init.loftq`).

        compute_dtype: of the 4-bit base; default the linear's dtype (float32 for float64).
        dtype: of the adapter; default the compute dtype (as QLoRALinear)."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"linear must be an nn.Linear (LoftQ needs its full-precision weight), "
                            f"got {type(linear).__name__}")
        check_adapter_args(adapter_name, r, alpha, dropout, rslora, "kaiming", dtype)
        check_loftq_bits_supported(loftq_bits, "loftq_bits")
        check_loftq_iter(loftq_iter, "loftq_iter")
        check_init_rank(r, tuple(linear.weight.shape))
        weight = linear.weight.detach()
        if compute_dtype is None:
            compute_dtype = weight.dtype if weight.dtype in FLOAT_WEIGHT_DTYPES else torch.float32
        dtype = dtype or compute_dtype
        result = loftq(weight, loftq_bits, r, loftq_iter, scaling=scaling_for(r, alpha, rslora), dtype=dtype,
                       blocksize=blocksize, double_quant=double_quant)
        base = LinearNF4(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         weight=torch.zeros_like(weight, dtype=weight.dtype if weight.dtype in FLOAT_WEIGHT_DTYPES
                                                 else torch.float32),
                         quant_type=result.base[1].quant_type, blocksize=blocksize, double_quant=double_quant,
                         compute_dtype=compute_dtype)
        _set_quantized(base, *result.base)
        if linear.bias is not None:
            base.bias.data.copy_(linear.bias.detach())
        layer = cls(linear.in_features, linear.out_features, r=r, alpha=alpha, dropout=dropout, base_layer=base,
                    adapter_name=adapter_name, rslora=rslora, dtype=dtype)
        layer.train(linear.training)
        layer.lora_A[adapter_name].weight.copy_(result.A)
        layer.lora_B[adapter_name].weight.copy_(result.B)
        return layer

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
            weight = self._apply_merge(name, weight)  # `W + delta`, or the adapter's variant's merge
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"merging adapters {names} into {label or self._label()} would write non-finite "
                             "values; nothing was written")
        return weight

    def _original_bias_merged(self, names: list[str], safe_merge: bool) -> torch.Tensor | None:
        """The pre-merge bias plus `scaling * b` of the merged adapters and `names` that have a
        lora_bias (as `_merged_weight` starts from the pre-merge weight); None if none has one."""
        everything = list(dict.fromkeys([*self.merged_adapters, *names]))
        return self._merged_bias(everything, safe_merge, start=self._premerge_bias)

    def check_mergeable(self, names: list[str], safe_merge: bool, label: str | None = None) -> None:
        """As `LoRALinear.check_mergeable`, for the dequantized 4-bit base (never tied)."""
        label = label or self._label()
        if self.base_layer.weight_packed.is_meta:
            raise ValueError(f"cannot merge into {label}: its base weight is on the meta device (no data)")
        self._check_bias_mergeable(names, label)
        if not safe_merge:
            return
        if not torch.isfinite(self._original_weight()).all():
            raise ValueError(f"base weight of {label} is not finite (its 4-bit absmax holds inf or nan, "
                             "before any adapter); nothing was written")
        self._check_deltas_finite(names, label)

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
        check_flag("safe_merge", safe_merge)
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        exact = self._merged_weight(names, safe_merge)
        bias = self._original_bias_merged(names, safe_merge)
        if self._premerge is None:
            self._premerge = self._packed_state()
            base_bias = self.base_layer.bias
            self._premerge_bias = base_bias.detach().clone() if base_bias is not None else None
        self.base_layer.set_weight(exact)
        if bias is not None:
            self.base_layer.bias.data.copy_(bias)
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
        if self._premerge_bias is not None:
            self.base_layer.bias.data.copy_(self._premerge_bias.to(self.base_layer.bias.device))
            self._premerge_bias = None
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
        check_flag("requantize", requantize)
        check_flag("safe_merge", safe_merge)
        names = self._adapters_to_merge(adapter_names)
        exact = self._merged_weight(names, safe_merge)
        bias = self._original_bias_merged(names, safe_merge)
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
            layer.bias.data.copy_(base.bias.detach() if bias is None else bias)
        layer.requires_grad_(False)
        return layer


register_lora_layer(LinearNF4, QLoRALinear)


def _set_quantized(layer: LinearNF4, packed: torch.Tensor, state) -> None:
    """Put an NF4 `(packed, QuantState)` (same blocksize and double quantization) into `layer`'s buffers."""
    layer.weight_packed = packed.to(layer.weight_packed.device)
    layer.absmax = state.absmax.to(layer.weight_packed.device)
    if layer.double_quant:
        layer.offset = state.offset.to(layer.weight_packed.device)
        layer.nested_absmax = state.nested_absmax.to(layer.weight_packed.device)
    layer.quant_state.validate(layer.weight_packed)
