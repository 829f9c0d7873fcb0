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
  The fewer-level types "nf3", "nf2", "int3", "int2" (8, 4, 7, 3 levels) use the same
  layout: their levels fill the first entries, zeros the rest, and their codes stay
  below the level count (`validate` checks both). They are stored in 4 bits per weight
  (`storage_bits`), like NF4; only `code_bits` says how much information a code carries.

`QuantState.to_dict()` flattens a state into a dict of tensors only (safetensors can
store it) and `QuantState.from_dict()` reads it back.

`QuantState.validate(packed)` is the one check that every reader of the format runs
before touching memory (the PyTorch path, the C loop of `quant.native`, the Triton
launchers of `loralab_kernels/`): a state read from a file or edited by hand can hold any
value, and the C and Triton kernels index raw memory with these lengths.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .codes import LOW_BIT_BITS, LOW_BIT_COUNT, STORAGE_BITS

# bitsandbytes accepts these block sizes for 4-bit quantization (powers of two, 32..4096).
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4", "int4", "nf3", "nf2", "int3", "int2")  # the last four: fewer levels, stored in 4 bits
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Upper bound of the nested blocksize (real ones are 256): keeps it, and every length
# computed from it, far inside the C loop's int64 (ctypes would silently truncate a
# larger Python int, e.g. 2**64 + 1 to 1).
MAX_NESTED_BLOCKSIZE = 2**31 - 1


@dataclass
class QuantState:
    """Metadata of a blockwise-quantized 4-bit tensor (bitsandbytes layout)."""

    absmax: torch.Tensor  # (nblocks,) float32, or uint8 when double-quantized
    shape: torch.Size  # shape of the original tensor
    dtype: torch.dtype  # dtype of the original tensor (and default output dtype)
    blocksize: int  # elements per absmax block: a power of two in [32, 4096]
    quant_type: str  # "nf4" or "fp4" (bitsandbytes' types); "int4", and "nf3", "nf2", "int3", "int2" (fewer levels, 4-bit storage) are this library's
    code: torch.Tensor  # (16,) float32 levels in [-1, 1], index = 4-bit code (fewer-level types: levels, then zeros)
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
    def code_bits(self) -> int:
        """Bits of information per weight: 4, or 3 / 2 for "nf3", "int3" / "nf2", "int2"."""
        return LOW_BIT_BITS.get(self.quant_type, 4)

    @property
    def storage_bits(self) -> int:
        """Bits each code occupies in memory and in files: 4 for every type (two per byte);
        the fewer-level types are padded into the 4-bit format, not packed tighter."""
        return STORAGE_BITS

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

    def validate(self, packed: torch.Tensor | None = None) -> None:
        """Raise ValueError/TypeError naming the field unless this state (and `packed`, when
        given) is a consistent 4-bit tensor: field types, dtypes, devices and exact lengths.

        Every kernel that reads the format (PyTorch, C, Triton) relies on these lengths to
        stay inside its buffers, so this runs before any of them. Values are checked too
        (`code` and `offset` finite) except on meta tensors and while torch.compile traces.
        """
        _check_scalars(self)
        nblocks = -(-self.numel // self.blocksize)
        ref = None  # (name, device) that every other tensor must share
        if packed is not None:
            ref = _check_tensor(packed, "packed", (torch.uint8,), None, None)
            if packed.numel() != (self.numel + 1) // 2:
                raise ValueError(f"packed has {packed.numel()} bytes but state.shape {tuple(self.shape)} "
                                 f"needs (numel + 1) // 2 = {(self.numel + 1) // 2}")
        absmax_dtype = torch.uint8 if self.double_quant else torch.float32
        absmax = _check_tensor(self.absmax, "state.absmax", (absmax_dtype,), nblocks, ref,
                               what="ceil(numel / blocksize)")
        ref = ref or absmax
        _check_tensor(self.code, "state.code", (torch.float32,), 16, ref)
        _check_finite(self.code, "state.code")
        if self.quant_type in LOW_BIT_COUNT:
            _check_low_bit(self.code, packed, self.quant_type)
        if self.double_quant:
            nested = -(-nblocks // self.nested_blocksize)
            _check_tensor(self.nested_absmax, "state.nested_absmax", (torch.float32,), nested, ref,
                          what="ceil(nblocks / nested_blocksize)")
            _check_tensor(self.nested_code, "state.nested_code", (torch.float32,), 256, ref)
            _check_tensor(self.offset, "state.offset", (torch.float32,), 1, ref)
            _check_finite(self.offset, "state.offset")

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
        """Inverse of `to_dict`; raises KeyError naming a missing key, ValueError/TypeError
        naming the key of a bad value, and validates the result (`validate`)."""
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict of tensors, got {type(d).__name__}")

        def get(key: str) -> torch.Tensor:
            if prefix + key not in d:
                raise KeyError(f"QuantState dict is missing the key {prefix + key!r}")
            if not isinstance(d[prefix + key], torch.Tensor):
                raise TypeError(f"{prefix + key} must be a torch.Tensor, got {type(d[prefix + key]).__name__}")
            return d[prefix + key]

        dtype_name = _decode(get("dtype"), prefix + "dtype")
        dtype = getattr(torch, dtype_name, None) if dtype_name.isidentifier() else None
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{prefix}dtype must name one of float32, float16, bfloat16, got {dtype_name!r}")
        shape = _int_list(get("shape"), prefix + "shape")
        state = cls(absmax=get("absmax"), shape=torch.Size(shape), dtype=dtype,
                    blocksize=_int_list(get("blocksize"), prefix + "blocksize", one=True),
                    quant_type=_decode(get("quant_type"), prefix + "quant_type"), code=get("code"))
        if prefix + "nested_absmax" in d:
            state.offset = get("offset").reshape(()) if get("offset").numel() == 1 else get("offset")
            state.nested_absmax = get("nested_absmax")
            state.nested_code = get("nested_code")
            state.nested_blocksize = _int_list(get("nested_blocksize"), prefix + "nested_blocksize", one=True)
        state.validate()
        return state


def _is_int(value) -> bool:
    """A Python int that is not a bool (True would otherwise pass as the blocksize 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_scalars(state: QuantState) -> None:
    """The non-tensor fields: types and ranges, before any length is computed from them."""
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"state.quant_type must be one of {QUANT_TYPES}, got {state.quant_type!r}")
    if not _is_int(state.blocksize) or state.blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"state.blocksize must be a power of two from 32 to 4096 {VALID_BLOCKSIZES}, "
                         f"got {state.blocksize!r}")
    if state.dtype not in FLOAT_DTYPES:
        raise TypeError(f"state.dtype must be torch.float32, torch.float16 or torch.bfloat16, got {state.dtype!r}")
    if not isinstance(state.shape, (tuple, list)) or not all(_is_int(s) and s >= 0 for s in state.shape):
        raise ValueError(f"state.shape must be a tuple of non-negative ints, got {state.shape!r}")
    parts = (state.offset, state.nested_absmax, state.nested_code)
    if any(t is None for t in parts) and any(t is not None for t in parts):
        raise ValueError("state.offset, state.nested_absmax and state.nested_code must all be set "
                         "(double quantization) or all be None")
    nbs = state.nested_blocksize
    if state.double_quant and (not _is_int(nbs) or not 1 <= nbs <= MAX_NESTED_BLOCKSIZE):
        raise ValueError(f"state.nested_blocksize must be an int from 1 to 2**31 - 1, got {nbs!r}")


def _check_tensor(t, name: str, dtypes: tuple, numel: int | None, ref: tuple[str, torch.device] | None,
                  what: str = "") -> tuple[str, torch.device]:
    """`t` is a dense tensor of one of `dtypes` with exactly `numel` elements (any number when
    None) on the device of `ref` = (name, device) (any device when None); returns (name, device)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be {allowed}, got {t.dtype}")
    # (not while torch.compile traces: dynamo bans reading .layout inside an autograd backward)
    if not torch.compiler.is_compiling() and t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} values, expected {numel}{f' = {what}' if what else ''}")
    if ref is not None and t.device != ref[1]:
        raise ValueError(f"{name} is on {t.device} but {ref[0]} is on {ref[1]}; move the state "
                         f"with state.to(device)")
    return name, t.device


# Tensors whose values passed `_check_finite`, by id: (weak reference, version counter). The
# check reads the values (a device sync on CUDA); this skips it for the same unmodified tensor,
# such as the shared code book that every layer's state holds.
_FINITE: dict[int, tuple[weakref.ref, int | None]] = {}


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return  # no values to read (meta and the fake tensors that torch.compile traces with)
    seen = _FINITE.get(id(t))
    if seen is not None and seen[0]() is t and seen[1] == _version(t) and seen[1] is not None:
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must hold finite values, got NaN or Inf")
    if len(_FINITE) > 4096:  # dead entries of freed tensors
        _FINITE.clear()
    _FINITE[id(t)] = (weakref.ref(t), _version(t))


def _checked(t: torch.Tensor, kind: str, check) -> None:
    """Run `check()` unless it passed before on this same unmodified tensor (cached by id and
    version, like `_check_finite`); nothing on meta tensors or while torch.compile traces."""
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return
    key = (id(t), kind)
    seen = _CHECKED.get(key)
    if seen is not None and seen[0]() is t and seen[1] == _version(t) and seen[1] is not None:
        return
    check()
    if len(_CHECKED) > 4096:
        _CHECKED.clear()
    _CHECKED[key] = (weakref.ref(t), _version(t))


_CHECKED: dict[tuple[int, str], tuple[weakref.ref, int | None]] = {}


def _check_low_bit(code: torch.Tensor, packed: torch.Tensor | None, quant_type: str) -> None:
    """A fewer-level type ("nf3", "nf2", "int3", "int2") padded into the 4-bit format: its
    L levels fill `code[:L]` and the padding `code[L:]` is zero, and every 4-bit code in
    `packed` is below L. A code at or past L would dequantize to a padding value that no
    quantizer of this type writes: a corrupted or mislabelled weight."""
    levels = LOW_BIT_COUNT[quant_type]

    def padding() -> None:
        if bool((code[levels:] != 0).any()):
            raise ValueError(f"state.code of quant_type={quant_type!r} must hold its {levels} levels in entries "
                             f"0..{levels - 1} and zeros after them, got {code.tolist()}")

    def codes() -> None:
        if packed.numel() and int(torch.maximum(packed >> 4, packed & 15).max()) >= levels:
            raise ValueError(f"packed holds 4-bit codes >= {levels}, but quant_type={quant_type!r} has only "
                             f"{levels} levels (codes 0..{levels - 1}): the weight is corrupted or of another type")

    _checked(code, "low_bit_padding", padding)
    if packed is not None:
        _checked(packed, f"codes_below_{levels}", codes)


def _int_list(t: torch.Tensor, key: str, one: bool = False):
    """The integer values of a stored tensor (exactly one when `one`), refusing float and bool."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{key} must be an integer tensor, got {t.dtype}")
    if one and t.numel() != 1:
        raise ValueError(f"{key} must hold exactly one value, got {t.numel()}")
    if not one and t.dim() != 1:
        raise ValueError(f"{key} must be a 1-D tensor of sizes, got shape {tuple(t.shape)}")
    values = [int(v) for v in t.reshape(-1).tolist()]
    return values[0] if one else values


def _encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("ascii")), dtype=torch.uint8)


def _decode(t: torch.Tensor, key: str) -> str:
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise TypeError(f"{key} must be a 1-D uint8 tensor of ASCII bytes, got {t.dtype} {tuple(t.shape)}")
    try:
        return bytes(t.tolist()).decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{key} must hold ASCII text") from None
