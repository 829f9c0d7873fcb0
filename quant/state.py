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

`QuantState.to_dict()` flattens a state into a dict of tensors only (safetensors can
store it) and `QuantState.from_dict()` reads it back.
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
    quant_type: str  # "nf4" or "fp4" (bitsandbytes' types); "int4" is this library's comparison type
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

    @property
    def nblocks(self) -> int:
        """Number of absmax blocks, `ceil(numel / blocksize)`."""
        return -(-self.numel // self.blocksize)

    def nbytes(self, include_codes: bool = False) -> int:
        """Bytes held by the state's tensors (absmax, nested absmax, offset).

        Args:
            include_codes: also count the code books (16 + 256 float32 values), which
                are constants shared by every layer and can be rebuilt from `quant_type`.
        """
        tensors = [self.absmax, self.offset, self.nested_absmax]
        if include_codes:
            tensors += [self.code, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy with every tensor moved to `device`."""
        def move(t):
            return None if t is None else t.to(device)
        return QuantState(absmax=move(self.absmax), shape=self.shape, dtype=self.dtype,
                          blocksize=self.blocksize, quant_type=self.quant_type, code=move(self.code),
                          offset=move(self.offset), nested_absmax=move(self.nested_absmax),
                          nested_code=move(self.nested_code), nested_blocksize=self.nested_blocksize)

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat dict of tensors (safetensors-friendly); strings are stored as uint8 bytes.

        Keys (each with `prefix`): absmax, code, shape, dtype, blocksize, quant_type, and
        with double quantization offset, nested_absmax, nested_code, nested_blocksize.
        """
        out = {
            "absmax": self.absmax,
            "code": self.code,
            "shape": torch.tensor(list(self.shape), dtype=torch.int64),
            "dtype": _encode(str(self.dtype).removeprefix("torch.")),
            "blocksize": torch.tensor([self.blocksize], dtype=torch.int64),
            "quant_type": _encode(self.quant_type),
        }
        if self.double_quant:
            out.update({
                "offset": self.offset.reshape(()),
                "nested_absmax": self.nested_absmax,
                "nested_code": self.nested_code,
                "nested_blocksize": torch.tensor([self.nested_blocksize], dtype=torch.int64),
            })
        return {prefix + k: v for k, v in out.items()}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], prefix: str = "") -> "QuantState":
        """Inverse of `to_dict`; raises KeyError naming a missing key, ValueError for a bad value."""
        def get(key: str) -> torch.Tensor:
            if prefix + key not in d:
                raise KeyError(f"QuantState dict is missing the key {prefix + key!r}")
            return d[prefix + key]

        dtype_name = _decode(get("dtype"))
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"QuantState dict has an unknown dtype {dtype_name!r}")
        state = cls(absmax=get("absmax"), shape=torch.Size(get("shape").tolist()), dtype=dtype,
                    blocksize=int(get("blocksize").reshape(-1)[0]), quant_type=_decode(get("quant_type")),
                    code=get("code"))
        if prefix + "nested_absmax" in d:
            state.offset = get("offset").reshape(())
            state.nested_absmax = get("nested_absmax")
            state.nested_code = get("nested_code")
            state.nested_blocksize = int(get("nested_blocksize").reshape(-1)[0])
        return state


def _encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("ascii")), dtype=torch.uint8)


def _decode(t: torch.Tensor) -> str:
    return bytes(t.to(torch.uint8).tolist()).decode("ascii")
