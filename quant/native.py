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
tests/test_quant_native.py checks that for every output dtype and both loops. The state
is validated (`QuantState.validate`) before the call, and the C function checks every
buffer length again and returns an error code instead of reading out of bounds.

Environment: `LORALAB_NATIVE=0` turns the C loop off (`available()` is False and
`dequantize_4bit` stays on its PyTorch path); `LORALAB_NATIVE=portable` uses the
portable C loop even on an AVX-512 CPU (to test a suite as an AVX2-only machine runs it);
unset or `1` picks the fastest loop. Without a C compiler the C loop is off too.
`reason()` says which loop runs, or why none does.

Trusting the build cache. Loading a shared library runs its code, so a library is loaded
only when all of these hold:

- The cache folder (`cache_dir()`) is a real folder, not a symbolic link, owned by this
  user and not writable by group or others; each folder above it is owned by root or
  this user and not writable by others unless sticky (like /tmp), so nobody else can
  rename it away and put another in its place. Missing folders are created one by one
  with `os.mkdir(path, 0o700)` and `chmod(0o700)`, whatever the umask. A folder that
  fails these checks is not used at all: the C loop is off and `reason()` says why.
- The library file is opened with O_NOFOLLOW (a symbolic link is refused), is a regular
  file owned by this user and not writable by group or others, and the SHA-256 of the
  bytes read from that open file equals the one in `<name>.sha256` beside it, which is
  itself checked the same way and was written by the build of this user. A file that
  fails is rebuilt (and `reason()` says what was refused).
- What is loaded is the very bytes that were hashed: they are written into a new file
  (O_CREAT | O_EXCL, mode 0700) in a new folder made by `tempfile.mkdtemp` (0700) in the
  verified cache folder, loaded from there, and the copy deleted. Nobody but this user
  (or root) can enter that folder, so there is no window between check and load in which
  another user could change the file. (Loading `/proc/self/fd/N` of the hashed
  descriptor would bind the file too, but glibc reuses an already loaded library whose
  name matches, and fd numbers are reused, so a second load could get the first library.)

A build compiles into a fresh private folder (`tempfile.mkdtemp` inside the cache, mode
0700) and hashes the result; then the hashed bytes and their hash are each written
atomically into the verified cache folder (`quant.atomic_file.atomic_write_bytes`: an
O_EXCL | O_NOFOLLOW temp file relative to the folder's descriptor, fsync, rename), so no
other user can write or swap a half-written file, and two processes building at once
both end with a valid pair.

Why not compile at install time (a setuptools extension in site-packages)? The library
would then be as trusted as any compiled dependency, but `pip install -e` in a checkout
puts it beside the sources, where an edited `dequant4.c` would leave a stale binary that
needs this very hash-and-rebuild logic anyway; a failing compiler at install must not
fail the install, and the OpenMP probe would have to be repeated in the build. The
first-use build with the checks above is the one path, tested on every run.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from .atomic_file import atomic_write_bytes
from .state import QuantState

SOURCE = Path(__file__).with_name("csrc") / "dequant4.c"
CFLAGS = ("-O3", "-shared", "-fPIC", "-std=c11", "-ffp-contract=off")  # no fused multiply-add: exact bits
OPENMP = ("-fopenmp",)  # tried first; a compiler without it builds the one-thread version
OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the C enum
# Below this many elements one thread does the whole weight: waking the other threads
# costs microseconds, about what one thread needs for a few thousand blocks.
PARALLEL_MIN_ELEMENTS = 2**20
ENV_VAR = "LORALAB_NATIVE"
MODES = {"0": "off", "1": "auto", "": "auto", "portable": "portable"}
FORCED_PORTABLE = "portable C loop (forced by LORALAB_NATIVE=portable)"


class _Args(ctypes.Structure):
    """`loralab_dequant4_args` of csrc/dequant4.c, field for field."""

    _fields_ = [
        ("packed", ctypes.c_void_p), ("packed_len", ctypes.c_int64),
        ("absmax", ctypes.c_void_p), ("qabsmax", ctypes.c_void_p), ("absmax_len", ctypes.c_int64),
        ("code8", ctypes.c_void_p), ("nested", ctypes.c_void_p), ("nested_len", ctypes.c_int64),
        ("nested_bs", ctypes.c_int64), ("offset", ctypes.c_float),
        ("code", ctypes.c_void_p), ("out", ctypes.c_void_p), ("out_len", ctypes.c_int64),
        ("b0", ctypes.c_int64), ("b1", ctypes.c_int64), ("bs", ctypes.c_int64),
        ("kind", ctypes.c_int32), ("simd", ctypes.c_int32), ("nthreads", ctypes.c_int32),
    ]


# The C function's error codes (the enum in csrc/dequant4.c).
C_ERRORS = {1: "blocksize", 2: "block range", 3: "packed too short", 4: "absmax too short",
            5: "nested absmax too short or nested blocksize < 1", 6: "out too short",
            7: "output kind", 8: "AVX-512 loop requested on a CPU without it", 9: "NULL pointer"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_simd = 0  # 1 when the AVX-512 loop is used by default
_cpu_simd = 0  # 1 when this CPU runs the AVX-512 loop (even if LORALAB_NATIVE=portable)
_reason = "not loaded yet"
_tried = False
_openmp = False


class Refused(Exception):
    """A cache folder or file that must not be trusted; the message says why."""


def cache_dir() -> Path:
    """Where built libraries live: $LORALAB_CACHE, else $XDG_CACHE_HOME/loralab, else ~/.cache/loralab."""
    if os.environ.get("LORALAB_CACHE"):
        return Path(os.environ["LORALAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loralab"


def _mode() -> str:
    """"off", "auto" or "portable", from LORALAB_NATIVE; anything else is a mistake worth raising."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value not in MODES:
        raise ValueError(f"{ENV_VAR} must be '0' (off), '1' (fastest loop) or 'portable', got {value!r}")
    return MODES[value]


# ---- trusting the cache ---------------------------------------------------------------

def _owner_problem(st: os.stat_result, what: str) -> str | None:
    """Why `st` is not this user's private file or folder, or None."""
    if st.st_uid != os.geteuid():
        return f"{what} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _check_ancestor(path: str) -> None:
    """A folder above the cache: nobody but root or this user may rename what is inside it."""
    st = os.stat(path)
    if st.st_uid not in (0, os.geteuid()):
        raise Refused(f"{path} (above the cache folder) is owned by uid {st.st_uid}")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise Refused(f"{path} (above the cache folder) is writable by group or others without "
                      f"the sticky bit (mode {stat.S_IMODE(st.st_mode):o})")


def _make_private_dirs(real: str) -> None:
    """Create the missing folders of the absolute path `real`, each 0700 whatever the umask."""
    missing = []
    p = real
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            continue  # made meanwhile by another process; checked like any existing folder
        os.chmod(folder, 0o700, follow_symlinks=False)


def open_private_dir(path: Path) -> int:
    """An O_DIRECTORY descriptor of the cache folder `path` after the checks in the module
    docstring (created 0700 when missing); raises `Refused` saying what is wrong."""
    path = Path(os.path.abspath(path))
    if os.path.islink(path):
        raise Refused(f"cache folder {path} is a symbolic link")
    real = os.path.realpath(path)  # folders above may be links; check where they lead
    _make_private_dirs(real)
    for parent in reversed(Path(real).parents):
        _check_ancestor(str(parent))
    try:
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:  # ELOOP: replaced by a link since; ENOTDIR: not a folder
        raise Refused(f"cache folder {path} cannot be opened as a folder: {e.strerror}") from None
    problem = _owner_problem(os.fstat(fd), f"cache folder {path}")
    if problem:
        os.close(fd)
        raise Refused(problem)
    return fd


def _read_private_file(dir_fd: int, name: str) -> bytes:
    """The bytes of `name` in the folder `dir_fd`: a regular file of this user, not a link,
    not writable by group or others. Raises FileNotFoundError or `Refused`."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise Refused(f"{name} cannot be opened without following links: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{name} is not a regular file")
        problem = _owner_problem(st, name)
        if problem:
            raise Refused(problem)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:  # closes fd
        return f.read()


def _verified_library(dir_fd: int, name: str) -> bytes:
    """The bytes of the cached library `name`, which hash to its recorded SHA-256.
    Raises FileNotFoundError when there is none, `Refused` when it must not be loaded."""
    data = _read_private_file(dir_fd, name)
    try:
        manifest = _read_private_file(dir_fd, name + ".sha256")
    except FileNotFoundError:
        raise Refused(f"{name} has no recorded SHA-256 ({name}.sha256)") from None
    recorded = manifest.decode("ascii", "replace").split(maxsplit=1)[:1]
    if recorded != [hashlib.sha256(data).hexdigest()]:
        raise Refused(f"{name} does not match its recorded SHA-256")
    return data


def _load_bytes(data: bytes, folder: str) -> ctypes.CDLL:
    """Load the library `data` (already verified) from a private copy (see the docstring)."""
    work = tempfile.mkdtemp(prefix=".load-", dir=folder)  # 0700, a new name
    try:
        path = os.path.join(work, "dequant4.so")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o700)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return ctypes.CDLL(path, mode=os.RTLD_NOW)  # mapped now; the file can go
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- building ---------------------------------------------------------------------------

def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def library_name(cc: str, flags: tuple[str, ...]) -> str:
    """The cache file name of a build: a hash of source, compiler, flags and machine."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc, *flags, platform.machine())).encode())
    return f"dequant4-{key.hexdigest()[:16]}.so"


def _build(cc: str, flags: tuple[str, ...], dir_fd: int, folder: str, name: str) -> bytes:
    """Compile SOURCE into the cache as `name` plus `name.sha256`; return the built bytes
    (those that were hashed). Compiles in a private temporary folder."""
    work = tempfile.mkdtemp(prefix=".build-", dir=folder)  # 0700, a new name: only we can enter
    try:
        built = os.path.join(work, name)
        subprocess.run([cc, *flags, str(SOURCE), "-o", built], check=True, capture_output=True,
                       text=True, timeout=120)
        os.chmod(built, 0o700, follow_symlinks=False)  # the linker's mode follows the umask
        work_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            data = _read_private_file(work_fd, name)
        finally:
            os.close(work_fd)
        manifest = f"{hashlib.sha256(data).hexdigest()}  {name}\n".encode()  # sha256sum's format
        # The very bytes that were hashed go into the cache; library first, so that a build
        # killed between the two leaves a library its old manifest refuses (and rebuilds).
        atomic_write_bytes(name, data, dir_fd=dir_fd, mode=0o700)
        atomic_write_bytes(name + ".sha256", manifest, dir_fd=dir_fd, mode=0o600)
        return data
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cached_or_built(cc: str, flags: tuple[str, ...], dir_fd: int, folder: str) -> tuple[ctypes.CDLL, str]:
    """(library, what was refused or "") for one set of flags: the verified cached build, else
    a new one."""
    name = library_name(cc, flags)
    refused = ""
    try:
        data = _verified_library(dir_fd, name)
    except FileNotFoundError:
        data = None
    except Refused as e:
        data, refused = None, f"rebuilt: cached {name} refused: {e}"
    if data is None:
        data = _build(cc, flags, dir_fd, folder, name)
    return _load_bytes(data, folder), refused


def _build_and_open(cc: str) -> tuple[ctypes.CDLL, str]:
    """The OpenMP build if the compiler makes one, else the one-thread build."""
    dir_fd = open_private_dir(cache_dir())
    folder = os.path.realpath(cache_dir())
    try:
        try:
            return _cached_or_built(cc, CFLAGS + OPENMP, dir_fd, folder)
        except (subprocess.CalledProcessError, OSError):
            return _cached_or_built(cc, CFLAGS, dir_fd, folder)
    finally:
        os.close(dir_fd)


def _load() -> None:
    global _lib, _simd, _cpu_simd, _reason, _tried, _openmp
    mode = _mode()  # raises on a typo before anything is cached
    _tried = True
    if mode == "off":
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
        lib, refused = _build_and_open(cc)
    except Refused as e:
        _reason = f"untrusted build cache, C loop off: {e} (use a private folder, e.g. LORALAB_CACHE)"
        return
    except subprocess.CalledProcessError as e:
        _reason = f"{cc} failed: {e.stderr.strip()[:500]}"
        return
    except (OSError, subprocess.SubprocessError) as e:
        _reason = f"could not build or load {SOURCE.name}: {e}"
        return
    lib.loralab_dequant4.argtypes = [ctypes.POINTER(_Args)]
    lib.loralab_dequant4.restype = ctypes.c_int
    lib.loralab_dequant4_simd.restype = ctypes.c_int
    lib.loralab_dequant4_openmp.restype = ctypes.c_int
    _cpu_simd = int(lib.loralab_dequant4_simd())
    _simd = 0 if mode == "portable" else _cpu_simd
    _openmp = bool(lib.loralab_dequant4_openmp())
    _lib = lib
    _reason = FORCED_PORTABLE if mode == "portable" else ("AVX-512 loop" if _simd else "portable C loop")
    if refused:
        _reason += f" ({refused})"


def available() -> bool:
    """True when the C dequantizer is built and loaded (builds it on the first call)."""
    if not _tried:
        with _lock:
            if not _tried:
                _load()
    return _lib is not None


def reason() -> str:
    """Which loop runs ("AVX-512 loop", "portable C loop", FORCED_PORTABLE), or why none does."""
    available()
    return _reason


def simd() -> bool:
    """True when the AVX-512 loop runs by default (False under LORALAB_NATIVE=portable)."""
    return available() and bool(_simd)


def openmp() -> bool:
    """True when the loaded library splits its work among OpenMP threads."""
    return available() and _openmp


# ---- calling ----------------------------------------------------------------------------

def _ptr(t: torch.Tensor | None, name: str, dtype: torch.dtype, numel: int) -> int | None:
    """data_ptr of a contiguous CPU tensor of `dtype` with at least `numel` elements (None -> NULL)."""
    if t is None:
        return None
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() or t.numel() < numel:
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of at least {numel} "
                         f"elements, got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t.data_ptr()


def _use_simd(simd: bool | None) -> int:
    if simd is not None and not isinstance(simd, bool):
        raise TypeError(f"simd must be None, True or False, got {simd!r}")
    if simd and not _simd:
        why = "LORALAB_NATIVE=portable" if _cpu_simd else "this CPU has no AVX-512 (avx512f and avx512bw)"
        raise RuntimeError(f"simd=True: the AVX-512 loop is off ({why})")
    return _simd if simd is None else int(simd)


def _scale_args(state: QuantState, nblocks: int) -> dict:
    """The absmax fields of `_Args` (plain float32, or the double-quantized triple)."""
    if not state.double_quant:
        return dict(absmax=_ptr(state.absmax, "state.absmax", torch.float32, nblocks),
                    absmax_len=state.absmax.numel())
    nested = -(-nblocks // state.nested_blocksize)
    return dict(qabsmax=_ptr(state.absmax, "state.absmax", torch.uint8, nblocks),
                absmax_len=state.absmax.numel(),
                code8=_ptr(state.nested_code, "state.nested_code", torch.float32, 256),
                nested=_ptr(state.nested_absmax, "state.nested_absmax", torch.float32, nested),
                nested_len=state.nested_absmax.numel(), nested_bs=state.nested_blocksize,
                offset=float(state.offset))


def dequantize_blocks(packed: torch.Tensor, state: QuantState, out: torch.Tensor, nblocks: int,
                      simd: bool | None = None) -> None:
    """Write the first `nblocks` whole blocks: `out[i] = code[q[i]] * absmax[i // blocksize]`.

    The float32 product and one rounding to out's dtype, as the PyTorch path; with double
    quantization the absmax of block b is `nested_code[absmax[b]] * nested_absmax[b // 256]
    + offset` (float32, bitsandbytes' order), computed here on the fly.

    Args:
        packed: `(n_bytes,)` uint8 codes, contiguous CPU tensor.
        state: its `QuantState` (tensors on the CPU, contiguous); validated here.
        out: `(>= nblocks * blocksize,)` float32, bfloat16 or float16, contiguous; written in place.
        nblocks: how many whole blocks to write, from the first (at most numel // blocksize).
        simd: None for the default loop (`simd()`), False for the portable one (tests);
            True insists on AVX-512.
    """
    if not available():
        raise RuntimeError(f"native dequantize is not available: {_reason}")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    state.validate(packed)
    if not isinstance(out, torch.Tensor) or out.dtype not in OUT_KINDS:
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"out must be float32, bfloat16 or float16, got {got}")
    bs = state.blocksize
    if isinstance(nblocks, bool) or not isinstance(nblocks, int) or not 0 <= nblocks <= state.numel // bs:
        raise ValueError(f"nblocks must be an int from 0 to numel // blocksize = {state.numel // bs}, "
                         f"got {nblocks!r}")
    args = _Args(packed=_ptr(packed, "packed", torch.uint8, nblocks * bs // 2), packed_len=packed.numel(),
                 code=_ptr(state.code, "state.code", torch.float32, 16),
                 out=_ptr(out, "out", out.dtype, nblocks * bs), out_len=out.numel(),
                 b0=0, b1=nblocks, bs=bs, kind=OUT_KINDS[out.dtype], simd=_use_simd(simd),
                 nthreads=min(torch.get_num_threads(), max(1, nblocks * bs // PARALLEL_MIN_ELEMENTS)),
                 **_scale_args(state, nblocks))
    err = _lib.loralab_dequant4(ctypes.byref(args))
    if err:
        raise ValueError(f"the C dequantizer refused its arguments (error {err}: "
                         f"{C_ERRORS.get(err, 'unknown')}); nothing was read or written")
