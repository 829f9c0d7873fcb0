"""One-pass CPU dequantization in C (`csrc/dequant4.c`), built at first use, PyTorch fallback.

`dequantize_4bit` in PyTorch takes three passes over memory (gather the level pairs,
scale, round to the output dtype) with a float32 temporary twice the size of a bf16
result; bitsandbytes' CPU kernel takes one. This module compiles a small C file (no
Python headers, no build step at install) with the system C compiler into a per-user
cache and loads it with `ctypes`, which releases the GIL during the call. OpenMP splits
the blocks among `torch.get_num_threads()` threads: in a process that has imported
torch, the library's libgomp.so.1 is PyTorch's own (the loader reuses the loaded one),
so these are the threads PyTorch's ops already keep running (separate Python threads
would compete with them for the cores). Without OpenMP the loop runs on one thread.

The C loop computes exactly what the PyTorch path does (float32 product
`code[q] * absmax`, one rounding), so results are bit for bit the same;
tests/test_quant_native.py checks that for every output dtype and both loops.
Without a C compiler, or with `LORALAB_NATIVE=0` in the environment, `available()` is
False and `dequantize_4bit` stays on its PyTorch path. `reason()` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from .state import QuantState

SOURCE = Path(__file__).with_name("csrc") / "dequant4.c"
CFLAGS = ("-O3", "-shared", "-fPIC", "-std=c11", "-ffp-contract=off")  # no fused multiply-add: exact bits
OPENMP = ("-fopenmp",)  # tried first; a compiler without it builds the one-thread version
OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the C enum
# Below this many elements one thread does the whole weight: waking the other threads
# costs microseconds, about what one thread needs for a few thousand blocks.
PARALLEL_MIN_ELEMENTS = 2**20

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_simd = 0
_reason = "not loaded yet"
_tried = False
_openmp = False


def cache_dir() -> Path:
    """Where built libraries live: $LORALAB_CACHE, else $XDG_CACHE_HOME/loralab, else ~/.cache/loralab."""
    if os.environ.get("LORALAB_CACHE"):
        return Path(os.environ["LORALAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loralab"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(cc: str, flags: tuple[str, ...]) -> Path:
    """Compile SOURCE into the cache (named by a hash of source, compiler and flags) and return
    the library's path; an existing build is reused. Written to a temporary file, then renamed."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc, *flags, platform.machine())).encode())
    target = cache_dir() / f"dequant4-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True,
                       text=True, timeout=120)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def _build_and_open(cc: str) -> ctypes.CDLL:
    """The OpenMP build if the compiler makes one, else the one-thread build."""
    try:
        return ctypes.CDLL(str(_build(cc, CFLAGS + OPENMP)), mode=os.RTLD_NOW)
    except (subprocess.CalledProcessError, OSError):
        return ctypes.CDLL(str(_build(cc, CFLAGS)), mode=os.RTLD_NOW)


def _load() -> None:
    global _lib, _simd, _reason, _tried, _openmp
    _tried = True
    if os.environ.get("LORALAB_NATIVE", "1") == "0":
        _reason = "disabled by LORALAB_NATIVE=0"
        return
    if sys.byteorder != "little":  # the bf16 bit tricks assume it
        _reason = "big-endian machine"
        return
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler found (set CC, or install cc/gcc/clang)"
        return
    try:
        lib = _build_and_open(cc)
    except subprocess.CalledProcessError as e:
        _reason = f"{cc} failed: {e.stderr.strip()[:500]}"
        return
    except (OSError, subprocess.SubprocessError) as e:
        _reason = f"could not build or load {SOURCE.name}: {e}"
        return
    lib.loralab_dequant4.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_float, ctypes.c_int64]
                                     + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 3)
    lib.loralab_dequant4.restype = None
    lib.loralab_dequant4_simd.restype = ctypes.c_int
    lib.loralab_dequant4_openmp.restype = ctypes.c_int
    _simd = int(lib.loralab_dequant4_simd())
    _openmp = bool(lib.loralab_dequant4_openmp())
    _lib = lib
    _reason = "AVX-512 loop" if _simd else "portable C loop"


def available() -> bool:
    """True when the C dequantizer is built and loaded (builds it on the first call)."""
    if not _tried:
        with _lock:
            if not _tried:
                _load()
    return _lib is not None


def reason() -> str:
    """Which loop runs ("AVX-512 loop", "portable C loop"), or why none does."""
    available()
    return _reason


def openmp() -> bool:
    """True when the loaded library splits its work among OpenMP threads."""
    return available() and _openmp


def _ptr(t: torch.Tensor | None, name: str, dtype: torch.dtype, numel: int) -> int | None:
    """data_ptr of a contiguous CPU tensor of `dtype` with at least `numel` elements (None -> NULL)."""
    if t is None:
        return None
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() or t.numel() < numel:
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of at least {numel} "
                         f"elements, got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t.data_ptr()


def dequantize_blocks(packed: torch.Tensor, state: QuantState, out: torch.Tensor, nblocks: int,
                      simd: bool | None = None) -> None:
    """Write the first `nblocks` whole blocks: `out[i] = code[q[i]] * absmax[i // blocksize]`.

    The float32 product and one rounding to out's dtype, as the PyTorch path; with double
    quantization the absmax of block b is `nested_code[absmax[b]] * nested_absmax[b // 256]
    + offset` (float32, bitsandbytes' order), computed here on the fly.

    Args:
        packed: `(n_bytes,)` uint8 codes, contiguous CPU tensor.
        state: its `QuantState` (tensors on the CPU).
        out: `(>= nblocks * blocksize,)` float32, bfloat16 or float16, contiguous; written in place.
        nblocks: how many whole blocks to write, from the first.
        simd: None for the fastest loop this CPU runs, False for the portable one (tests);
            True insists on AVX-512.
    """
    if not available():
        raise RuntimeError(f"native dequantize is not available: {_reason}")
    if out.dtype not in OUT_KINDS:
        raise TypeError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
    bs = state.blocksize
    if bs < 32 or bs % 2:
        raise ValueError(f"state.blocksize must be even and at least 32, got {bs}")
    if simd and not _simd:
        raise RuntimeError("simd=True: this CPU has no AVX-512 (avx512f and avx512bw)")
    use_simd = _simd if simd is None else int(simd)
    p = _ptr(packed, "packed", torch.uint8, nblocks * bs // 2)
    c = _ptr(state.code, "state.code", torch.float32, 16)
    o = _ptr(out, "out", out.dtype, nblocks * bs)
    if state.double_quant:
        nested_bs = state.nested_blocksize
        a = None
        q = _ptr(state.absmax, "state.absmax", torch.uint8, nblocks)
        c8 = _ptr(state.nested_code, "state.nested_code", torch.float32, 256)
        nested = _ptr(state.nested_absmax, "state.nested_absmax", torch.float32, -(-nblocks // nested_bs))
        offset = float(state.offset)
    else:
        nested_bs, q, c8, nested, offset = 0, None, None, None, 0.0
        a = _ptr(state.absmax, "state.absmax", torch.float32, nblocks)
    kind = OUT_KINDS[out.dtype]

    threads = min(torch.get_num_threads(), max(1, nblocks * bs // PARALLEL_MIN_ELEMENTS))
    _lib.loralab_dequant4(p, a, q, c8, nested, offset, nested_bs, c, o, 0, nblocks, bs, kind,
                          use_simd, threads)
