"""The one-pass C dequantizer (quant/native.py) against the PyTorch path, bit for bit."""
from __future__ import annotations

import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant import dequantize_4bit, native, quantize_4bit

ROOT = Path(__file__).resolve().parents[1]
HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
needs_native = pytest.mark.skipif(not native.available(), reason=f"no native dequantize: {native.reason()}")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _loops():
    """Both loops; the AVX-512 one is skipped where the CPU lacks it or LORALAB_NATIVE=portable
    turns it off (`native.simd()` is False)."""
    return [False, pytest.param(True, marks=pytest.mark.skipif(
        not native.simd(), reason=f"no AVX-512 loop: {native.reason()}"))]


@pytest.mark.skipif(not HAS_CC or os.environ.get("LORALAB_NATIVE") == "0",
                    reason="no C compiler, or disabled")
def test_builds_where_a_compiler_exists():
    # On a machine with a compiler the fast path must really be in use, not silently skipped.
    assert native.available(), native.reason()
    if shutil.which("gcc"):
        assert native.openmp()
    if os.environ.get("LORALAB_NATIVE") == "portable":
        assert native.reason() == native.FORCED_PORTABLE and not native.simd()
    elif platform.machine() in ("x86_64", "AMD64") and "avx512f" in Path("/proc/cpuinfo").read_text():
        assert native.reason() == "AVX-512 loop"


@needs_native
@pytest.mark.parametrize("shape", [(64, 64), (7, 33), (3, 1000), (5,), (130, 96), (1, 4097), (2, 3, 160)])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_same_bits_as_torch_path(shape, blocksize, double_quant):
    torch.manual_seed(sum(shape) + blocksize)
    w = torch.randn(shape) * 3
    for quant_type in ("nf4", "fp4", "int4"):
        packed, state = quantize_4bit(w, quant_type, blocksize, double_quant)
        for dtype in DTYPES:
            ref = dequantize_4bit(packed, state, dtype, impl="torch")
            got = dequantize_4bit(packed, state, dtype, impl="native")
            assert got.dtype == dtype and got.shape == w.shape
            assert torch.equal(got, ref), (quant_type, dtype)


@needs_native
@pytest.mark.parametrize("simd", _loops())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-38, 1e-30, 1.0, 7e4, 1e30])
def test_extreme_scales_every_loop(simd, dtype, scale):
    # Subnormal products (tiny absmax), float16 overflow to inf (huge absmax): the C rounding
    # must equal torch's conversion there too, in the portable and the AVX-512 loop.
    torch.manual_seed(1)
    w = torch.randn(8, 256) * scale
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=False)
    ref = dequantize_4bit(packed, state, dtype, impl="torch").reshape(-1)
    out = torch.empty(w.numel(), dtype=dtype)
    native.dequantize_blocks(packed, state, out, state.nblocks, simd=simd)
    assert torch.equal(out, ref)


@needs_native
@pytest.mark.parametrize("simd", _loops())
def test_portable_and_simd_loops_on_double_quant(simd):
    torch.manual_seed(2)
    w = torch.randn(300, 128)  # 600 blocks of 64: three nested blocks of 256, the last partial
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
    for dtype in DTYPES:
        out = torch.empty(w.numel(), dtype=dtype)
        native.dequantize_blocks(packed, state, out, state.nblocks, simd=simd)
        assert torch.equal(out, dequantize_4bit(packed, state, dtype, impl="torch").reshape(-1))


@needs_native
def test_threads_split_the_blocks_exactly():
    torch.manual_seed(3)
    w = torch.randn(1536, 1001)  # 1.5M elements: above PARALLEL_MIN_ELEMENTS; odd tail block
    packed, state = quantize_4bit(w, "nf4", 64)
    ref = dequantize_4bit(packed, state, torch.bfloat16, impl="torch")
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(dequantize_4bit(packed, state, torch.bfloat16), ref), t
    finally:
        torch.set_num_threads(threads)


def _child_dequantize(queue):
    # OpenMP (PyTorch's and so ours) is not fork-safe once the parent used its threads:
    # like PyTorch's DataLoader workers, a forked child runs on one thread.
    torch.set_num_threads(1)
    w = torch.randn(2048, 1024)
    packed, state = quantize_4bit(w)
    out = dequantize_4bit(packed, state, torch.bfloat16, impl="native")
    queue.put(bool(torch.equal(out, dequantize_4bit(packed, state, torch.bfloat16, impl="torch"))))


@needs_native
@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_works_in_a_forked_child_after_threads_ran():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = torch.randn(2048, 1024)
        dequantize_4bit(*quantize_4bit(w))  # the parent's OpenMP threads start
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child_dequantize, args=(queue,))
        proc.start()
        proc.join(timeout=60)
        assert proc.exitcode == 0
        assert queue.get(timeout=5) is True
    finally:
        torch.set_num_threads(threads)


# ---- out= ---------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["torch", "native"])
def test_out_is_written_and_returned(impl):
    if impl == "native" and not native.available():
        pytest.skip(native.reason())
    w = torch.randn(33, 70)
    packed, state = quantize_4bit(w)
    buf = torch.full((w.numel(),), float("nan"), dtype=torch.bfloat16)
    got = dequantize_4bit(packed, state, impl=impl, out=buf)
    assert got.shape == w.shape and got.dtype == torch.bfloat16
    assert got.data_ptr() == buf.data_ptr()  # no new tensor
    assert torch.equal(got, dequantize_4bit(packed, state, torch.bfloat16, impl="torch"))


def test_out_errors_name_the_argument():
    packed, state = quantize_4bit(torch.randn(8, 64))
    with pytest.raises(TypeError, match="out has dtype torch.float16, but dtype is torch.float32"):
        dequantize_4bit(packed, state, torch.float32, out=torch.empty(512, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be a contiguous tensor of 512 elements"):
        dequantize_4bit(packed, state, out=torch.empty(511))
    with pytest.raises(ValueError, match="not contiguous"):
        dequantize_4bit(packed, state, out=torch.empty(64, 8).t())
    with pytest.raises(ValueError, match="out must not require grad"):
        dequantize_4bit(packed, state, out=torch.empty(512, requires_grad=True))
    with pytest.raises(TypeError, match="out must be a torch.Tensor or None"):
        dequantize_4bit(packed, state, out=[0.0] * 512)


def test_impl_errors(monkeypatch):
    packed, state = quantize_4bit(torch.randn(8, 64))
    with pytest.raises(ValueError, match="impl must be one of"):
        dequantize_4bit(packed, state, impl="cuda")
    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", "no C compiler found")
    with pytest.raises(RuntimeError, match="impl='native'.*no C compiler found"):
        dequantize_4bit(packed, state, impl="native")
    # "auto" falls back to PyTorch with the same result
    assert torch.equal(dequantize_4bit(packed, state), dequantize_4bit(packed, state, impl="torch"))


def test_dequantize_blocks_checks_its_tensors():
    if not native.available():
        pytest.skip(native.reason())
    packed, state = quantize_4bit(torch.randn(8, 64), double_quant=False)
    with pytest.raises(ValueError, match="out must be a contiguous CPU torch.float32 tensor of at least 512"):
        native.dequantize_blocks(packed, state, torch.empty(100), state.nblocks)
    with pytest.raises(TypeError, match="packed must be uint8"):
        native.dequantize_blocks(packed.int(), state, torch.empty(512), state.nblocks)
    with pytest.raises(TypeError, match="out must be float32, bfloat16 or float16"):
        native.dequantize_blocks(packed, state, torch.empty(512, dtype=torch.float64), state.nblocks)


# ---- building -------------------------------------------------------------------------

def _probe(env_extra: dict, tmp_path: Path) -> str:
    """`native.reason()` and a dequantize in a fresh interpreter with `env_extra` set."""
    env = {**os.environ, "LORALAB_CACHE": str(tmp_path / "cache"), **env_extra}
    env.pop("LORALAB_NATIVE", None) if "LORALAB_NATIVE" not in env_extra else None
    code = ("import torch; from quant import native, quantize_4bit, dequantize_4bit; "
            "w = torch.randn(4, 64); p, s = quantize_4bit(w); "
            "d = dequantize_4bit(p, s); assert torch.equal(d, dequantize_4bit(p, s, impl='torch')); "
            "print(native.reason())")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)  # a safety net: builds under heavy load took minutes
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
def test_build_goes_to_the_cache_atomically(tmp_path):
    assert _probe({}, tmp_path) in ("AVX-512 loop", "portable C loop", native.FORCED_PORTABLE)
    built = sorted((tmp_path / "cache").iterdir())  # the library and its recorded SHA-256
    assert [p.name for p in built] == [built[0].name, built[0].name + ".sha256"]
    assert built[0].name.startswith("dequant4-") and built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    _probe({}, tmp_path)  # a second process reuses the build
    assert sorted((tmp_path / "cache").iterdir()) == built
    assert built[0].stat().st_mtime_ns == mtime


def test_disabled_or_broken_compiler_falls_back_to_pytorch(tmp_path):
    assert _probe({"LORALAB_NATIVE": "0"}, tmp_path) == "disabled by LORALAB_NATIVE=0"
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    reason = _probe({"CC": str(broken)}, tmp_path)
    assert "failed" in reason and "cannot compile" in reason
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-written
