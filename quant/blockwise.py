"""Blockwise absmax quantization: 4-bit weights (NF4/FP4/INT4, and NF3/NF2/INT3/INT2 in the
4-bit layout) and 8-bit double quantization.

The arithmetic follows bitsandbytes' CPU path step by step (same float32 operations in
the same order), so packed bytes and absmax values agree bit for bit:

- 4-bit: one float32 absmax per block of the flattened tensor; full blocks are scaled
  by `x * (1 / absmax)`, the last partial block by `x / absmax`; the scaled value goes
  to the nearest level of the code book, a tie to the lower level (`torch.bucketize`
  over the midpoints of the sorted code; `quant.search` computes the same result faster).
  The packed layout is two codes per byte, element 2i in the high nibble; for an odd
  element count the last low nibble holds the code of 0.0.
- 8-bit (the nested absmax of double quantization, QLoRA sec. 3): bitsandbytes maps a
  scaled value v in [-1, 1] to one of 65536 bins, `int(((v + 1) * 0.5) * 65535 + 0.5)`,
  and each bin to the level nearest its center. This equals "nearest level" except
  for values within 2**-16 of a midpoint between two levels.

Dequantization computes `code[q] * absmax[block]` in float32 and rounds once to the
output dtype, as bitsandbytes does, so both libraries return identical tensors.
Known bitsandbytes 0.50 CPU quirks (not copied): its native 4-bit dequantize returns
wrong values for some shapes whose last dimension is not a multiple of the blocksize
(e.g. (4, 96) at blocksize 64; its own quantizer and its PyTorch fallback agree with
this module there), and it returns shape (1, n) for 1-D weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from . import native
from .codes import dynamic_map_8bit, shared_code
from .packing import unpack_nibbles
from .search import nearest_codes
from .state import FLOAT_DTYPES, MAX_NESTED_BLOCKSIZE, QUANT_TYPES, VALID_BLOCKSIZES, QuantState

# QLoRA sec. 3: the absmax values are double-quantized in blocks of 256.
NESTED_BLOCKSIZE = 256
_LUT_BINS = 65536  # bins of bitsandbytes' 8-bit lookup table
CHUNK = 2**18  # elements per step of the 4-bit loops: temporaries of ~1 MB stay in cache
POOL_MIN_CHUNKS_PER_THREAD = 4  # fewer chunks than this per thread: no thread pool (measured on 2 cores)


def check_blocksize(blocksize: int, name: str = "blocksize") -> int:
    """Return `blocksize` if it is one of `VALID_BLOCKSIZES`, else raise ValueError."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"{name} must be a power of two from 32 to 4096 {VALID_BLOCKSIZES}, "
                         f"got {blocksize!r}")
    return blocksize


def check_weight(w: torch.Tensor, name: str = "w") -> None:
    """Raise unless `w` is a non-empty float32/float16/bfloat16 tensor (`name` in the message)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got {w.dtype}")
    if w.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {w.layout}")
    if w.numel() == 0:
        raise ValueError(f"{name} must have at least one element")


def _check_finite(absmax: torch.Tensor, name: str = "w") -> None:
    # max |x| of a block is NaN or Inf exactly when the block holds a NaN or an Inf.
    # A meta tensor has no values: quantizing one gives meta outputs of the right shapes.
    if absmax.device.type != "meta" and not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"{name} contains NaN or Inf; quantization needs finite weights")


def _check_int(value, name: str, low: int, high: int) -> int:
    """`value` if it is an int (not a bool) in [low, high], else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int from {low} to {high}, got {value!r}")
    return value


def _check_code_256(code: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The 8-bit code book: default the dynamic map, else a (256,) float tensor (on `device`)."""
    if code is None:
        return dynamic_map_8bit().to(device)
    if not isinstance(code, torch.Tensor) or not code.dtype.is_floating_point or code.numel() != 256:
        got = f"{code.dtype} {tuple(code.shape)}" if isinstance(code, torch.Tensor) else type(code).__name__
        raise ValueError(f"code must be a float tensor of 256 levels (one per uint8 code), got {got}")
    return code.to(device=device, dtype=torch.float32).reshape(-1)


@contextlib.contextmanager
def _single_threaded():
    """Run small CPU ops on one thread: on a loaded machine a parallel op's thread barrier
    costs milliseconds, more than the work on a few hundred thousand elements."""
    if torch.compiler.is_compiling():  # traced code has no thread count to change
        yield
        return
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def _for_chunks(step: Callable[[int, int], None], full: int, blocksize: int, device: torch.device) -> None:
    """Call `step(start, stop)` over [0, full) in chunks of whole blocks (the result does not
    depend on the chunking).

    On the CPU, chunks of ~CHUNK elements keep the temporaries in cache, and with T > 1
    torch threads and at least 4 T chunks, the chunks run on T Python threads with single-threaded torch ops
    (the ops release the GIL): this avoids one thread barrier per op per chunk, which on
    a loaded machine costs more than the work. The global thread count is restored after.
    On other devices, and under torch.compile, the whole range is one step.
    """
    if full == 0:
        return
    if device.type != "cpu" or torch.compiler.is_compiling():  # one step; the compiler fuses it
        step(0, full)
        return
    chunk = max(blocksize, CHUNK // blocksize * blocksize)
    bounds = [(start, min(start + chunk, full)) for start in range(0, full, chunk)]
    threads = torch.get_num_threads()
    # A pool (and the thread-count switch around it) costs about a millisecond: worth it
    # for big weights only. Small ones, a model's usual layers, run their chunks in turn.
    if threads == 1 or len(bounds) < POOL_MIN_CHUNKS_PER_THREAD * threads:
        for start, stop in bounds:
            step(start, stop)
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda b: step(*b), bounds))  # list() re-raises a worker's exception
    finally:
        torch.set_num_threads(threads)


def _quantize_blocks(blocks: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Full blocks `(nb, blocksize)` of any float dtype -> (codes `(nb * blocksize,)` uint8, absmax `(nb,)` float32).

    bitsandbytes' arithmetic: absmax = max |x| of the block, scaled = x * (1 / absmax)
    in float32 (an all-zero block keeps absmax 0 and scales by 1e38, giving codes of 0).
    Clamping the scaled value to [-1, 1] first, as bitsandbytes does, never changes its
    level because every bound lies inside (-1, 1), so it is skipped.
    """
    lo, hi = torch.aminmax(blocks, dim=1)
    absmax = torch.maximum(-lo, hi).float()  # == |x|.max() per block, without an |x| temporary
    _check_finite(absmax)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)  # (nb, blocksize) float32
    return nearest_codes(scaled.view(-1), quant_type), absmax


def _quantize_tail(tail: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The last, partial block: bitsandbytes divides by its absmax (clamped to 1e-38) instead."""
    am = tail.float().abs().max().clamp(min=1e-38)
    _check_finite(am)
    scaled = torch.clamp(tail.float() / am, -1, 1)
    return nearest_codes(scaled, quant_type), am.reshape(1)


def _pack_into(codes: torch.Tensor, out: torch.Tensor) -> None:
    """Write `(2m,)` uint8 codes into `out` `(m,)` two per byte, element 2i in the high nibble."""
    pairs = codes.view(-1, 2)  # (m, 2): (high, low)
    torch.add(pairs[:, 1], pairs[:, 0], alpha=16, out=out)


@functools.lru_cache(maxsize=8)
def _lut_8bit(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    centers = -1.0 + (2.0 * torch.arange(_LUT_BINS, dtype=torch.float32)) / (_LUT_BINS - 1)
    return torch.searchsorted(midpoints, centers).to(torch.uint8)  # (65536,)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor | None = None,
                            blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise absmax quantization of a float32 vector (bitsandbytes' CPU rounding).

    Args:
        x: `(n,)` float32 values.
        code: `(256,)` sorted float32 levels; default the dynamic 8-bit map.
        blocksize: values per absmax block (256 for double quantization, QLoRA sec. 3).

    Returns:
        `codes` `(n,)` uint8 and `absmax` `(ceil(n / blocksize),)` float32.
    """
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point torch.Tensor, got {got}")
    _check_int(blocksize, "blocksize", 1, MAX_NESTED_BLOCKSIZE)
    code = _check_code_256(code, torch.device("cpu")).contiguous()
    _check_finite(code, "code")
    lut = _lut_8bit(code.numpy().tobytes()).to(x.device)
    x = x.reshape(-1).float()  # (n,)
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, nblocks * blocksize - n))  # zeros do not change absmax
    blocks = padded.view(nblocks, blocksize)  # (nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    _check_finite(absmax, "x")  # a NaN would index the lookup table out of range
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)  # zero block -> code 0
    v = (blocks * inv.unsqueeze(1)).clamp_(-1, 1)
    idx = (((v + 1.0) * 0.5) * (_LUT_BINS - 1) + 0.5).to(torch.int64)  # truncation, as C's cast
    q = lut[idx]
    q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)
    q = q.view(-1)  # (nblocks * blocksize,)
    return (q[:n].clone() if q.numel() > n else q), absmax  # own storage of exactly n bytes


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                              blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`: `code[q] * absmax[block]`, `(n,)` float32.

    Args:
        q: `(n,)` uint8 codes (any shape, flattened).
        absmax: `(ceil(n / blocksize),)` float32 scales on q's device.
        code: `(256,)` float levels; default the dynamic 8-bit map.
        blocksize: codes per absmax value, a positive int.
    """
    if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"q must be a uint8 torch.Tensor of 8-bit codes, got {got}")
    _check_int(blocksize, "blocksize", 1, MAX_NESTED_BLOCKSIZE)
    nblocks = -(-q.numel() // blocksize)
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.numel() != nblocks:
        got = f"{absmax.dtype} with {absmax.numel()} values" if isinstance(absmax, torch.Tensor) \
            else type(absmax).__name__
        raise ValueError(f"absmax must be a float32 tensor of ceil(q.numel() / blocksize) = {nblocks} "
                         f"values, got {got}")
    if absmax.device != q.device:
        raise ValueError(f"absmax is on {absmax.device} but q is on {q.device}")
    code = _check_code_256(code, q.device)
    values = code.index_select(0, q.reshape(-1).int())  # (n,)
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty_like(values)
    torch.mul(values[:full].view(-1, blocksize), absmax[: full // blocksize].float().unsqueeze(1),
              out=out[:full].view(-1, blocksize))  # (n // blocksize, blocksize)
    if full < n:
        out[full:] = values[full:] * absmax[-1].float()
    return out


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization in bitsandbytes' layout (QLoRA sec. 3).

    Args:
        w: float32, float16 or bfloat16 tensor of any shape; finite.
        quant_type: "nf4" (NormalFloat), "fp4" (bitsandbytes' E2M1) or "int4"
            (symmetric +-7; this library only, for comparison); or, this library only,
            "nf3" / "nf2" (`normal_float_code(3)` / `(2)`: 8 / 4 levels) and "int3" / "int2"
            (+-3 / +-1: 7 / 3 levels). Those search only their own levels and are stored in
            the same 4-bit layout (the levels fill the first entries of the 16-entry code).
        blocksize: elements per absmax block, a power of two from 32 to 4096.
        double_quant: also quantize the absmax values to 8 bits in blocks of 256,
            after subtracting their mean (QLoRA sec. 3): 0.5 -> ~0.127 bits per parameter.

    Returns:
        `packed` `((n + 1) // 2,)` uint8 (element 2i in the high nibble) and a `QuantState`.
    """
    check_weight(w)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):  # a string such as "no" would be true
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    flat = w.reshape(-1)  # (n,)
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)

    def step(start: int, stop: int) -> None:
        codes, absmax[start // blocksize: stop // blocksize] = _quantize_blocks(
            flat[start:stop].view(-1, blocksize), quant_type)  # (nb, blocksize)
        _pack_into(codes, packed[start // 2: stop // 2])

    _for_chunks(step, full, blocksize, w.device)
    if full < n:
        codes, absmax[-1:] = _quantize_tail(flat[full:], quant_type)
        if codes.numel() % 2:  # odd n: the pad nibble codes 0.0, as bitsandbytes
            codes = torch.cat([codes, nearest_codes(codes.new_zeros(1, dtype=torch.float32), quant_type)])
        _pack_into(codes, packed[full // 2:])
    code = shared_code(quant_type, w.device)
    state = QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=code)
    if double_quant:
        offset = absmax.mean()
        with _single_threaded():
            qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset)
        state.absmax = qabsmax
        state.offset = offset
        state.nested_absmax = nested_absmax
        state.nested_code = shared_code("dynamic8", w.device)
        state.nested_blocksize = NESTED_BLOCKSIZE
    return packed, state


def state_absmax(state: QuantState) -> torch.Tensor:
    """The float32 absmax per block, undoing double quantization when it was used."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    state.validate()
    if not state.double_quant:
        return state.absmax.float()
    with _single_threaded():
        absmax = dequantize_blockwise_8bit(state.absmax, state.nested_absmax, state.nested_code,
                                           state.nested_blocksize)
        return absmax + state.offset.float()


def check_packed(packed: torch.Tensor, state: QuantState) -> None:
    """Raise a clear error when `packed` or `state` cannot be dequantized together
    (`QuantState.validate`: every field, before any kernel reads memory)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    state.validate(packed)


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """`(256,)` int64 whose 8 bytes are the two float32 levels a byte stands for (high nibble
    first): one 8-byte gather per byte is much faster than gathering rows of a (256, 2) table."""
    byte = torch.arange(256, device=code.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).contiguous()  # (256, 2) float32
    return pairs.view(torch.int64).view(-1)  # (256,)


def _levels(table: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """float32 level of every nibble of `packed` `(m,)` uint8, in order: `(2m,)`."""
    return table.index_select(0, packed.int()).view(torch.float32)  # (m,) int64 -> (2m,) float32


def _contiguous(state: QuantState) -> QuantState:
    """`state` itself, or a copy whose tensors are contiguous (the C loop reads raw memory;
    a validated state already has the dtypes it needs)."""
    fields = ("absmax", "code", "nested_absmax", "nested_code")
    if all(getattr(state, f) is None or getattr(state, f).is_contiguous() for f in fields):
        return state
    return dataclasses.replace(state, **{f: getattr(state, f).contiguous() for f in fields
                                         if getattr(state, f) is not None})


def _last_absmax(state: QuantState) -> torch.Tensor:
    """The float32 absmax of the last block alone (`state_absmax(state)[-1]`, same arithmetic)."""
    if not state.double_quant:
        return state.absmax[-1].float()
    last = dequantize_blockwise_8bit(state.absmax[-1:], state.nested_absmax[-1:], state.nested_code,
                                     state.nested_blocksize)  # (1,)
    return last[0] + state.offset.float()


def _dequantize_full_torch(flat: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
                           out: torch.Tensor, full: int, bs: int) -> None:
    """The PyTorch path for the first `full` elements (whole blocks), in chunks."""

    def step(start: int, stop: int) -> None:
        scale = absmax[start // bs: stop // bs].unsqueeze(1)  # (nb, 1)
        if out.dtype == torch.float32:  # gather the level pairs straight into the output, scale in place
            dst = out[start:stop].view(torch.int64)  # (m,): 8 bytes = two float32 levels; start is even
            torch.index_select(table, 0, flat[start // 2: stop // 2].int(), out=dst)
            dst.view(torch.float32).view(-1, bs).mul_(scale)
            return
        values = _levels(table, flat[start // 2: stop // 2]).view(-1, bs)  # (nb, bs) float32
        # float32 product, rounded once to dtype on the write (bitsandbytes' order of operations)
        torch.mul(values, scale, out=out[start:stop].view(-1, bs))

    _for_chunks(step, full, bs, flat.device)


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses that a non-empty strided tensor can touch (strides are >= 0)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))  # element offset
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check_no_overlap(out: torch.Tensor, packed: torch.Tensor, state: QuantState) -> None:
    """`out` is written while `packed` and the state are read: they must not share memory."""
    if out.device.type == "meta" or out.numel() == 0:
        return
    o0, o1 = _extent(out)
    named = {"packed": packed, "state.absmax": state.absmax, "state.code": state.code,
             "state.offset": state.offset, "state.nested_absmax": state.nested_absmax,
             "state.nested_code": state.nested_code}
    for name, t in named.items():
        if t is None or t.numel() == 0:
            continue
        t0, t1 = _extent(t)
        if o0 < t1 and t0 < o1:
            raise ValueError(f"out overlaps {name} in memory; dequantize_4bit reads {name} while it "
                             f"writes out, so pass a separate buffer")


def _check_out(out: torch.Tensor, n: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}, but dtype is {dtype}")
    if out.requires_grad:
        raise ValueError("out must not require grad: dequantize_4bit writes into it in place")
    if out.numel() != n or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out must be a contiguous tensor of {n} elements on {device}, "
                         f"got shape {tuple(out.shape)} on {out.device}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")


def check_out(out: torch.Tensor, packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """`out` as a flat view after checking it can take the dequantized weight (`dequantize_4bit`'s `out=`)."""
    _check_out(out, state.numel, dtype, packed.device)
    _check_no_overlap(out, packed, state)
    return out.view(-1)


def dequantize_into(packed: torch.Tensor, state: QuantState, out: torch.Tensor, loop: str = "torch") -> None:
    """Write `code[q] * absmax[block]` (float32 product, one rounding) into `out`: the kernel
    body of the `loralab::dequantize_4bit` ops (quant/ops.py), for a validated state.

    Args:
        packed: the uint8 codes (any shape).
        state: their validated `QuantState`.
        out: contiguous `(state.numel,)` float32, bfloat16 or float16, written in place.
        loop: "torch" (PyTorch ops), "native" (the C loop's default) or "portable" (the C
            loop without AVX-512) for the whole blocks; all give the same bits.
    """
    n, bs = state.numel, state.blocksize
    flat = packed.reshape(-1)  # (n_bytes,)
    full = n - n % bs
    use_native = loop != "torch"
    table = None if use_native and full == n else \
        _pair_table(state.code.to(device=packed.device, dtype=torch.float32))  # (256,) int64
    if use_native:  # the same arithmetic in one pass of C, absmax included
        native.dequantize_blocks(flat.contiguous(), _contiguous(state), out, full // bs,
                                 simd=False if loop == "portable" else None)
        last_absmax = _last_absmax(state) if full < n else None
    else:
        absmax = state_absmax(state)
        _dequantize_full_torch(flat, absmax, table, out, full, bs)
        last_absmax = absmax[-1] if full < n else None  # no block at all when n == 0
    if full < n:  # the last, partial block
        values = _levels(table, flat[full // 2:])[: n - full]  # (n - full,)
        out[full:] = values * last_absmax


def unpack_codes(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The 4-bit codes of all `state.numel` elements, `(n,)` uint8 (for tests and kernels)."""
    check_packed(packed, state)
    return unpack_nibbles(packed, state.numel)
