"""`QuantState`: everything needed, besides the packed codes, to dequantize a 4-bit weight.

The fields mirror bitsandbytes' `QuantState` so that a weight quantized by either
library can be read by the other (see `quant.blockwise`).

Layout of one quantized tensor `w` with `n = w.numel()` elements, flattened in
row-major order:

- packed codes: `uint8`, shape `((n + 1) // 2,)`; element `2i` in the high nibble,
  element `2i + 1` in the low nibble (bitsandbytes' order).
- `absmax`: one scale per block of `blocksize` consecutive elements,
  `nblocks = ceil(n / blocksize)`. Without double quantization it is `float32`;
  with double quantization (QLoRA sec. 3) it is `uint8` codes into `nested_code`
  and the real absmax of block `b` is
  `nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset`.
- `code`: the 16 levels (`float32`, in [-1, 1]); weight element = `code[q] * absmax[block]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantState:
    """Metadata of a blockwise-quantized 4-bit tensor (bitsandbytes layout)."""

    absmax: torch.Tensor  # (nblocks,) float32, or uint8 when double-quantized
    shape: torch.Size  # shape of the original tensor
    dtype: torch.dtype  # dtype of the original tensor (and default output dtype)
    blocksize: int  # elements per absmax block: a power of two in [32, 4096]
    quant_type: str  # "nf4" or "fp4"
    code: torch.Tensor  # (16,) float32 levels in [-1, 1], index = 4-bit code
    # Double quantization (QLoRA sec. 3); all None when it is off.
    offset: torch.Tensor | None = None  # () float32: mean of the absmax values, subtracted before 8-bit quantization
    nested_absmax: torch.Tensor | None = None  # (ceil(nblocks / nested_blocksize),) float32
    nested_code: torch.Tensor | None = None  # (256,) float32: bitsandbytes' signed dynamic 8-bit map
    nested_blocksize: int = 256  # absmax values per nested block (QLoRA sec. 3 uses 256)

    @property
    def double_quant(self) -> bool:
        """True when `absmax` is itself 8-bit quantized."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n
