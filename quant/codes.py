"""Code books: the 16 (or 256) values a 4-bit (or 8-bit) code stands for.

A code book is a float32 tensor; the code `q` of an element means the value
`code[q] * absmax` of its block. The index order is bitsandbytes', so packed bytes
written here and by bitsandbytes mean the same values.
"""
from __future__ import annotations

import functools

import torch

# QLoRA sec. 3: the outermost quantile of NF4. It is the mean of 1 - 1/(2 * 15) and
# 1 - 1/(2 * 16), the tail probabilities that center the outer bins of a 15-level and a
# 16-level quantile code; bitsandbytes writes 0.9677083. NF3 and NF2 use the same offset
# (see `normal_float_code`).
NF4_OFFSET = 0.9677083


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")


def centered_offset(bits: int) -> float:
    """QLoRA's construction of the NF4 offset carried to `bits` bits: the mean of
    `1 - 1/(2(2^k - 1))` and `1 - 1/(2 * 2^k)` (0.9333 for 3 bits, 0.8542 for 2; 0.9677 for 4).
    This project's NF3/NF2 used it before revision 2 of their code books (`CODE_REVISION`);
    pass it as `normal_float_code(bits, offset=centered_offset(bits))` to study that code."""
    _check_bits(bits)
    k = 2**bits
    return 0.5 * ((1 - 1 / (2 * (k - 1))) + (1 - 1 / (2 * k)))


@functools.lru_cache(maxsize=None)
def _normal_float_code(bits: int, offset: float) -> torch.Tensor:
    from scipy.stats import norm  # imported lazily: only code-book construction needs scipy

    half = 2 ** (bits - 1)
    # Quantile points in float32 exactly as bitsandbytes' create_normal_map builds them.
    pos = norm.ppf(torch.linspace(offset, 0.5, half + 1)[:-1].numpy())  # half positive levels
    neg = -norm.ppf(torch.linspace(offset, 0.5, half)[:-1].numpy())  # half - 1 negative levels
    values = torch.tensor(list(pos) + [0.0] + list(neg), dtype=torch.float32)
    values = values.sort().values
    return values / values.max()


def normal_float_code(bits: int = 4, offset: float | None = None) -> torch.Tensor:
    """The k-bit NormalFloat code book (QLoRA sec. 3), sorted, in [-1, 1].

    NormalFloat puts its levels at quantiles of N(0, 1), so each level receives the
    same expected share of normally distributed values: the information-theoretically
    optimal data type for N(0, sigma) weights once each block is scaled by its absmax.
    To get an exact zero (padding, ReLU outputs, pruned weights) the code is asymmetric:
    `2**(bits-1)` positive quantiles from [offset, 0.5) and `2**(bits-1) - 1` negative
    ones, plus zero, all divided by the largest so that the code spans [-1, 1].

    The outermost quantile is NF4's 0.9677083 (QLoRA sec. 3) at every width, as in LoftQ's
    reference code and PEFT's `NFQuantizer.create_normal_map` (PEFT <= 0.19), so NF2 is
    -1, 0, 0.338, 1 and every k-bit code equals theirs. Measured on 21 layers of SmolLM2-135M
    (blocksize 64, docs/06-starting-points.md): against `centered_offset(k)`, NF4's construction
    carried to k bits, this offset quantizes NF2 0.7% better (relative error 0.566 vs 0.570) and
    ends LoftQ 0.3-1.0% lower, while NF3 is 0.7% worse (0.2059 vs 0.2044) and LoftQ 3-bit
    -0.3% to +1.2%. No offset wins at every width; one shared with LoftQ's 2-bit results
    and PEFT makes "same bits, same code" comparisons exact.

    Args:
        bits: Bits per code, 2 to 8.
        offset: Outermost quantile in (0.5, 1); default `NF4_OFFSET` = 0.9677083.

    Returns:
        `(2**bits,)` float32 tensor, ascending, with `code[2**(bits-1) - 1] == 0`.
    """
    _check_bits(bits)
    if offset is None:
        offset = NF4_OFFSET
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not 0.5 < offset < 1.0:
        raise ValueError(f"offset must lie in (0.5, 1), got {offset!r}")
    return _normal_float_code(bits, float(offset)).clone()


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels (QLoRA sec. 3): `normal_float_code(4)`, bitsandbytes' values.

    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0 (index = 4-bit code).
    """
    return normal_float_code(4)


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit), index = 4-bit code.

    Bit 3 is the sign; for the exponent field `e` (bits 2-1) and mantissa `m` (bit 0)
    the magnitude is `(1 + m/2) * 2**(4 - e)` for `e > 0` and `m / 16` for `e == 0`
    (a subnormal), i.e. 0, 0.0625, 8, 12, 4, 6, 2, 3; divided by 12 into [-1, 1].
    The code is not sorted and holds both +0 (code 0) and -0 (code 8).
    """
    mags = []
    for bits in range(8):
        e, m = bits >> 1, bits & 1
        mags.append((1 + m / 2) * 2.0 ** (4 - e) if e > 0 else m / 16)
    code = torch.tensor(mags + [-v for v in mags], dtype=torch.float32)
    return code / code.abs().max()


def int4_code() -> torch.Tensor:
    """Symmetric 4-bit integers +-7 divided by 7 (for comparison), bitsandbytes' order.

    Index i < 8 means (7 - i) / 7 and index i >= 8 means -(i - 8) / 7, so 0 appears twice
    and only 15 distinct levels are used.
    """
    code = torch.tensor([7 - i for i in range(8)] + [-(i - 8) for i in range(8, 16)],
                        dtype=torch.float32)
    return code / 7


@functools.lru_cache(maxsize=None)
def _dynamic_map_8bit() -> torch.Tensor:
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def dynamic_map_8bit() -> torch.Tensor:
    """The signed dynamic 8-bit map (Dettmers 2016), used to store the double-quantized absmax.

    Equals bitsandbytes' `create_dynamic_map(signed=True)`: a sign bit, a run of zero
    bits giving a decimal exponent 10^-6 .. 10^0, and the remaining bits a linear
    fraction in [0.1, 1]; plus 0 and 1. Sorted, 256 float32 values in [-0.993, 1].
    """
    return _dynamic_map_8bit().clone()


def int_code(bits: int) -> torch.Tensor:
    """Symmetric `bits`-bit integers +-(2^(bits-1) - 1) divided by their largest, sorted
    (for comparison with NormalFloat): 7 levels for 3 bits, 3 (-1, 0, 1) for 2 bits.
    One code of the 2^bits stays unused, as in `int4_code`."""
    top = 2 ** (bits - 1) - 1
    return torch.arange(-top, top + 1, dtype=torch.float32) / top


# Revision of the code books whose values have changed since files were first written with
# them; `Linear4bit`'s format tag records it, so codes saved with other values are refused
# instead of decoded with these. NF3/NF2 revision 1 (untagged): offset `centered_offset(k)`;
# revision 2: NF4's offset at every width. Types not listed are at revision 1.
CODE_REVISION = {"nf3": 2, "nf2": 2}


def code_revision(quant_type: str) -> int:
    """The revision of `quant_type`'s code book values (`CODE_REVISION`, 1 if not listed)."""
    if quant_type not in CODE_BOOKS:
        raise ValueError(f"quant_type must be one of {sorted(CODE_BOOKS)}, got {quant_type!r}")
    return CODE_REVISION.get(quant_type, 1)


# Fewer-bit types: their levels go first in the 16-entry table of the 4-bit format and the
# rest is zero padding that no quantizer produces. Storage stays 4 bits per weight (two
# codes per byte), so every storage figure of such a weight is that of a 4-bit one.
LOW_BIT_LEVELS = {"nf3": lambda: normal_float_code(3), "nf2": lambda: normal_float_code(2),
                  "int3": lambda: int_code(3), "int2": lambda: int_code(2)}
LOW_BIT_BITS = {"nf3": 3, "nf2": 2, "int3": 3, "int2": 2}
LOW_BIT_COUNT = {"nf3": 8, "nf2": 4, "int3": 7, "int2": 3}  # len(code_levels(t)), without building it
STORAGE_BITS = 4  # bits each code occupies in memory and in files, whatever the type


def code_levels(quant_type: str) -> torch.Tensor:
    """The levels a quantizer may choose for `quant_type`: the 16 entries of a 4-bit type
    (FP4 and INT4 hold duplicate zeros), or the 8 / 7 / 4 / 3 sorted levels of
    "nf3" / "int3" / "nf2" / "int2" (the entries of `get_code` before its padding)."""
    if quant_type in LOW_BIT_LEVELS:
        return LOW_BIT_LEVELS[quant_type]()
    return get_code(quant_type)


def num_levels(quant_type: str) -> int:
    """Number of codes a weight of `quant_type` may hold (16 for the 4-bit types)."""
    return code_levels(quant_type).numel()


def code_bits(quant_type: str) -> int:
    """Bits of information per weight of `quant_type` (2, 3 or 4); storage is always
    `STORAGE_BITS` = 4 (the low-bit types are padded into the 4-bit format)."""
    if quant_type not in CODE_BOOKS:
        raise ValueError(f"quant_type must be one of {sorted(CODE_BOOKS)}, got {quant_type!r}")
    return LOW_BIT_BITS.get(quant_type, 4)


def _padded(quant_type: str) -> torch.Tensor:
    levels = LOW_BIT_LEVELS[quant_type]()
    return torch.cat([levels, levels.new_zeros(16 - levels.numel())])  # (16,)


CODE_BOOKS = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code,
              **{name: functools.partial(_padded, name) for name in LOW_BIT_LEVELS}}


def get_code(quant_type: str) -> torch.Tensor:
    """The 16-entry code book of `quant_type`: "nf4", "fp4", "int4", or a fewer-bit type
    "nf3", "nf2", "int3", "int2" whose levels (`code_levels`) fill the first entries and
    zeros the rest."""
    if quant_type not in CODE_BOOKS:
        raise ValueError(f"quant_type must be one of {sorted(CODE_BOOKS)}, got {quant_type!r}")
    return CODE_BOOKS[quant_type]()


_SHARED: dict[tuple[str, str], torch.Tensor] = {}


def shared_code(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """One float32 code book per (`quant_type`, device), shared by every quantized weight on
    that device: a type of `CODE_BOOKS` (16 entries) or "dynamic8" (the 256-entry nested map
    of double quantization). Layers hold this same tensor, so a model pays for each code
    book once, as with bitsandbytes. Read-only by contract: never modify it in place.
    """
    if quant_type != "dynamic8" and quant_type not in CODE_BOOKS:
        raise ValueError(f"quant_type must be one of {sorted(CODE_BOOKS) + ['dynamic8']}, got {quant_type!r}")
    device = torch.device(device)
    key = (quant_type, str(device))
    if key not in _SHARED:
        code = dynamic_map_8bit() if quant_type == "dynamic8" else get_code(quant_type)
        _SHARED[key] = code.to(device)
    return _SHARED[key]
