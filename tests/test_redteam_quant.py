"""Red-team tests of quant/ (and the kernels' launchers): an untrusted build cache must never
run foreign code, a tampered QuantState must never reach memory, and bad input must raise
a ValueError/TypeError naming what is wrong instead of giving a silent wrong answer.

The native-cache tests load the C library afresh with the module state reset (and one in a
second process), each with its own LORALAB_CACHE, so the library this process already
loaded cannot mask the result. Every planted library runs a constructor that writes a
marker file: the marker must never appear.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loralab_kernels
from quant import LinearNF4, QuantState, dequantize_4bit, native, quantize_4bit
from quant.blockwise import (
    dequantize_blockwise_8bit,
    quantize_blockwise_8bit,
    state_absmax,
    unpack_codes,
)
from quant.packing import pack_nibbles, unpack_nibbles

ROOT = Path(__file__).resolve().parents[1]
CC = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
needs_cc = pytest.mark.skipif(CC is None or sys.platform != "linux", reason="needs a C compiler on Linux")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
OTHER_UID = 12345
STATE_GLOBALS = ("_lib", "_simd", "_cpu_simd", "_reason", "_tried", "_openmp")

PLANTED_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
int loralab_dequant4_simd(void) { return 0; }
int loralab_dequant4_openmp(void) { return 0; }
int loralab_dequant4(const void *args) { (void)args; return 0; }
"""


# ---- helpers for the native cache ---------------------------------------------------------

def _load_fresh(cache: Path, mode: str | None = None) -> tuple[bool, str]:
    """(available, reason) of a first load with LORALAB_CACHE=cache; the module state is
    restored afterwards, so this process keeps the library it had."""
    saved = {name: getattr(native, name) for name in STATE_GLOBALS}
    env = {k: os.environ.get(k) for k in ("LORALAB_CACHE", "LORALAB_NATIVE")}
    os.environ["LORALAB_CACHE"] = str(cache)
    if mode is None:
        os.environ.pop("LORALAB_NATIVE", None)
    else:
        os.environ["LORALAB_NATIVE"] = mode
    native._tried, native._lib, native._reason = False, None, "not loaded yet"
    try:
        return native.available(), native.reason()
    finally:
        for name, value in saved.items():
            setattr(native, name, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _library(cache: Path) -> Path:
    (lib,) = cache.glob("dequant4-*.so")
    return lib


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    """A cache folder holding one legitimate, verified build."""
    cache = tmp_path_factory.mktemp("golden") / "cache"
    ok, reason = _load_fresh(cache)
    if not ok:
        pytest.skip(f"no native build here: {reason}")
    return cache


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    """(a valid ELF library whose constructor writes a marker file, that marker's path)."""
    folder = tmp_path_factory.mktemp("planted")
    src, lib, marker = folder / "planted.c", folder / "planted.so", folder / "MARKER"
    src.write_text(PLANTED_C)
    subprocess.run([CC, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(src), "-o", str(lib)],
                   check=True, capture_output=True, timeout=60)
    return lib, marker


def _plant(cache: Path, planted_lib: Path, record_hash: bool = True) -> Path:
    """Put the planted library under the cached library's name (and, when `record_hash`, its
    hash in the manifest, so that only the check under test can stop it)."""
    target = _library(cache)
    target.unlink()
    shutil.copyfile(planted_lib, target)
    target.chmod(0o700)
    if record_hash:
        Path(str(target) + ".sha256").write_text(f"{_sha256(target)}  {target.name}\n")
    return target


def _copy(golden: Path, dest: Path) -> Path:
    shutil.copytree(golden, dest)
    return dest


# ---- A. the build cache: nothing untrusted is ever loaded --------------------------------

def _other_owner(cache, lib):
    os.chown(_plant(cache, lib), OTHER_UID, -1)


def _group_writable(cache, lib):
    _plant(cache, lib).chmod(0o770)


def _wrong_hash(cache, lib):
    _plant(cache, lib, record_hash=False)


def _symlink_file(cache, lib):
    target = _plant(cache, lib)
    elsewhere = cache.parent / "elsewhere.so"
    target.rename(elsewhere)
    target.symlink_to(elsewhere)


def _manifest_other_owner(cache, lib):
    target = _plant(cache, lib)
    os.chown(str(target) + ".sha256", OTHER_UID, -1)


def _manifest_missing(cache, lib):
    target = _plant(cache, lib)
    os.unlink(str(target) + ".sha256")


def _manifest_symlink(cache, lib):
    target = _plant(cache, lib)
    manifest = Path(str(target) + ".sha256")
    moved = cache.parent / "elsewhere.sha256"
    manifest.rename(moved)
    manifest.symlink_to(moved)


FILE_TAMPERS = {  # name: (tamper, what reason() must say)
    "library_other_owner": (_other_owner, f"owned by uid {OTHER_UID}"),
    "library_group_writable": (_group_writable, "writable by group or others"),
    "library_replaced_same_name": (_wrong_hash, "does not match its recorded SHA-256"),
    "library_symlink": (_symlink_file, "without following links"),
    "manifest_other_owner": (_manifest_other_owner, f"owned by uid {OTHER_UID}"),
    "manifest_missing": (_manifest_missing, "no recorded SHA-256"),
    "manifest_symlink": (_manifest_symlink, "without following links"),
}


@needs_cc
@pytest.mark.parametrize("case", sorted(FILE_TAMPERS))
def test_tampered_cached_library_is_refused_and_rebuilt(case, golden, planted, tmp_path):
    if "other_owner" in case and os.geteuid() != 0:
        pytest.skip("chown needs root")
    tamper, why = FILE_TAMPERS[case]
    lib, marker = planted
    marker.unlink(missing_ok=True)  # each case on its own
    cache = _copy(golden, tmp_path / "cache")
    tamper(cache, lib)
    ok, reason = _load_fresh(cache)
    assert not marker.exists(), "the planted library ran"
    assert ok and why in reason and "rebuilt" in reason, reason
    rebuilt = _library(cache)  # a fresh, verified build replaced the planted one
    assert not rebuilt.is_symlink() and rebuilt.read_bytes() == _library(golden).read_bytes()
    assert Path(str(rebuilt) + ".sha256").read_text().split()[0] == _sha256(rebuilt)


def _world_writable_folder(tmp, golden, lib):
    cache = _copy(golden, tmp / "cache")
    _plant(cache, lib)
    cache.chmod(0o777)
    return cache


def _group_writable_folder(tmp, golden, lib):
    cache = _copy(golden, tmp / "cache")
    _plant(cache, lib)
    cache.chmod(0o770)
    return cache


def _folder_other_owner(tmp, golden, lib):
    cache = _copy(golden, tmp / "cache")
    _plant(cache, lib)
    os.chown(cache, OTHER_UID, -1)
    return cache


def _folder_symlink(tmp, golden, lib):
    real = _copy(golden, tmp / "real")
    _plant(real, lib)
    (tmp / "cache").symlink_to(real)
    return tmp / "cache"


def _unsafe_parent(tmp, golden, lib):
    shared = tmp / "shared"
    shared.mkdir()
    cache = _copy(golden, shared / "cache")
    _plant(cache, lib)
    shared.chmod(0o777)  # anyone may rename "cache" away and put their own in its place
    return cache


FOLDER_TAMPERS = {
    "folder_world_writable": (_world_writable_folder, "writable by group or others (mode 777)"),
    "folder_group_writable": (_group_writable_folder, "writable by group or others (mode 770)"),
    "folder_other_owner": (_folder_other_owner, f"owned by uid {OTHER_UID}"),
    "folder_symlink": (_folder_symlink, "is a symbolic link"),
    "folder_parent_world_writable": (_unsafe_parent, "above the cache folder"),
}


@needs_cc
@pytest.mark.parametrize("case", sorted(FOLDER_TAMPERS))
def test_untrusted_cache_folder_is_never_used(case, golden, planted, tmp_path):
    if "other_owner" in case and os.geteuid() != 0:
        pytest.skip("chown needs root")
    make, why = FOLDER_TAMPERS[case]
    lib, marker = planted
    marker.unlink(missing_ok=True)  # each case on its own
    cache = make(tmp_path, golden, lib)
    ok, reason = _load_fresh(cache)
    assert not marker.exists(), "the planted library ran"
    assert not ok and "untrusted build cache" in reason and why in reason, reason


@needs_cc
def test_sticky_world_writable_parent_is_fine(golden, tmp_path):
    shared = tmp_path / "tmp-like"
    cache = _copy(golden, shared / "cache")
    shared.chmod(0o1777)  # like /tmp: others cannot rename what is not theirs
    ok, reason = _load_fresh(cache)
    assert ok and reason in ("AVX-512 loop", "portable C loop"), reason


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_cache_folders_are_created_0700_whatever_the_umask(umask, tmp_path):
    target = tmp_path / "a" / "b" / "cache"
    old = os.umask(umask)
    try:
        os.close(native.open_private_dir(target))
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert folder.stat().st_mode & 0o7777 == 0o700, folder


@needs_cc
def test_second_process_reuses_the_verified_build(golden, tmp_path):
    cache = _copy(golden, tmp_path / "cache")
    lib = _library(cache)
    before = (lib.stat().st_ino, lib.stat().st_mtime_ns)
    env = {**os.environ, "LORALAB_CACHE": str(cache)}
    env.pop("LORALAB_NATIVE", None)
    code = ("import torch; from quant import native, quantize_4bit, dequantize_4bit; "
            "p, s = quantize_4bit(torch.randn(4, 64)); "
            "assert torch.equal(dequantize_4bit(p, s, impl='native'), dequantize_4bit(p, s, impl='torch')); "
            "print(native.reason())")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in ("AVX-512 loop", "portable C loop")
    assert (lib.stat().st_ino, lib.stat().st_mtime_ns) == before  # not rebuilt
    assert sorted(p.name for p in cache.iterdir()) == [lib.name, lib.name + ".sha256"]


@needs_cc
def test_portable_override(golden):
    ok, reason = _load_fresh(golden, mode="portable")
    assert ok and reason == "portable C loop (forced by LORALAB_NATIVE=portable)"


def test_unknown_native_mode_raises(golden):
    with pytest.raises(ValueError, match=r"LORALAB_NATIVE must be '0'.*got 'fast'"):
        _load_fresh(golden, mode="fast")


# ---- B. a tampered QuantState never reaches memory ------------------------------------------

def _state(double_quant=True, shape=(5, 6400), blocksize=64):
    """A valid weight: 500 blocks of 64, so two nested blocks of 256 when double-quantized."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return quantize_4bit(w, "nf4", blocksize, double_quant)


def _replace(**fields):
    return lambda s: dataclasses.replace(s, **fields)


TAMPERED = {  # name: (double_quant, change to the state, exception, field the message names)
    "nested_blocksize_-1": (True, _replace(nested_blocksize=-1), ValueError, "nested_blocksize"),
    "nested_blocksize_0": (True, _replace(nested_blocksize=0), ValueError, "nested_blocksize"),
    "nested_blocksize_2**64+1": (True, _replace(nested_blocksize=2**64 + 1), ValueError, "nested_blocksize"),
    "nested_blocksize_2**31": (True, _replace(nested_blocksize=2**31), ValueError, "nested_blocksize"),
    "nested_blocksize_bool": (True, _replace(nested_blocksize=True), ValueError, "nested_blocksize"),
    "nested_blocksize_float": (True, _replace(nested_blocksize=256.0), ValueError, "nested_blocksize"),
    "nested_absmax_one_value": (True, lambda s: dataclasses.replace(s, nested_absmax=s.nested_absmax[:1]),
                                ValueError, "nested_absmax"),
    "nested_blocksize_1_short_nested": (True, _replace(nested_blocksize=1), ValueError, "nested_absmax"),
    "nested_absmax_float16": (True, lambda s: dataclasses.replace(s, nested_absmax=s.nested_absmax.half()),
                              TypeError, "nested_absmax"),
    "nested_code_255": (True, lambda s: dataclasses.replace(s, nested_code=s.nested_code[:255]),
                        ValueError, "nested_code"),
    "offset_nan": (True, _replace(offset=torch.tensor(float("nan"))), ValueError, "offset"),
    "offset_inf": (True, _replace(offset=torch.tensor(float("inf"))), ValueError, "offset"),
    "offset_two_values": (True, _replace(offset=torch.zeros(2)), ValueError, "offset"),
    "offset_float64": (True, _replace(offset=torch.tensor(0.5, dtype=torch.float64)), TypeError, "offset"),
    "offset_missing": (True, _replace(offset=None), ValueError, "offset"),
    "absmax_float_with_double_quant": (True, lambda s: dataclasses.replace(s, absmax=s.absmax.float()),
                                       TypeError, "state.absmax"),
    "absmax_uint8_without_double_quant": (False, lambda s: dataclasses.replace(s, absmax=s.absmax.to(torch.uint8)),
                                          TypeError, "state.absmax"),
    "absmax_short": (False, lambda s: dataclasses.replace(s, absmax=s.absmax[:-1]), ValueError, "state.absmax"),
    "absmax_long": (True, lambda s: dataclasses.replace(s, absmax=torch.cat([s.absmax, s.absmax[:1]])),
                    ValueError, "state.absmax"),
    "absmax_on_meta": (False, lambda s: dataclasses.replace(s, absmax=s.absmax.to("meta")),
                       ValueError, "state.absmax is on meta"),
    "absmax_not_tensor": (False, _replace(absmax=[1.0] * 30), TypeError, "state.absmax"),
    "blocksize_0": (False, _replace(blocksize=0), ValueError, "state.blocksize"),
    "blocksize_-64": (False, _replace(blocksize=-64), ValueError, "state.blocksize"),
    "blocksize_bool": (False, _replace(blocksize=True), ValueError, "state.blocksize"),
    "blocksize_2**64+64": (False, _replace(blocksize=2**64 + 64), ValueError, "state.blocksize"),
    "blocksize_128_same_absmax": (False, _replace(blocksize=128), ValueError, "state.absmax"),
    "code_15_levels": (False, lambda s: dataclasses.replace(s, code=s.code[:15]), ValueError, "state.code"),
    "code_float64": (False, lambda s: dataclasses.replace(s, code=s.code.double()), TypeError, "state.code"),
    "code_nan": (False, lambda s: dataclasses.replace(s, code=torch.full((16,), float("nan"))),
                 ValueError, "state.code"),
    "shape_negative": (False, _replace(shape=(-3, -640)), ValueError, "state.shape"),
    "shape_float": (False, _replace(shape=(3.0, 640)), ValueError, "state.shape"),
    "shape_bigger": (False, _replace(shape=(6, 6400)), ValueError, "packed has 16000 bytes"),
    "quant_type_unknown": (False, _replace(quant_type="nf5"), ValueError, "state.quant_type"),
    "dtype_int64": (False, _replace(dtype=torch.int64), TypeError, "state.dtype"),
}


def _impls():
    return ["torch"] + (["native"] if native.available() else [])


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_state_raises_naming_the_field(case, impl):
    double_quant, tamper, exc, field = TAMPERED[case]
    packed, state = _state(double_quant)
    with pytest.raises(exc, match=field.replace("*", r"\*")):
        dequantize_4bit(packed, tamper(state), impl=impl)


@pytest.mark.parametrize("case", ["nested_blocksize_-1", "nested_absmax_one_value", "blocksize_0",
                                  "code_15_levels", "absmax_short"])
def test_every_reader_runs_the_same_check(case):
    double_quant, tamper, exc, field = TAMPERED[case]
    packed, state = _state(double_quant)
    bad = tamper(state)
    readers = [lambda: unpack_codes(packed, bad), lambda: state_absmax(bad),
               lambda: loralab_kernels.dequantize_nf4(packed, bad),
               lambda: loralab_kernels.nf4_linear(torch.randn(2, 6400), packed, bad),
               lambda: QuantState.from_dict(bad.to_dict())]
    if native.available():
        readers.append(lambda: native.dequantize_blocks(packed, bad, torch.empty(32000), 500))
    for read in readers:
        with pytest.raises(exc, match=field):
            read()


def test_c_function_checks_lengths_itself():
    # Bypass every Python check: the C function must refuse, not read past `nested`.
    if not native.available():
        pytest.skip(native.reason())
    packed, state = _state(True, shape=(64, 1024))  # 1024 blocks of 64: four nested blocks
    out = torch.empty(packed.numel() * 2)
    args = native._Args(packed=packed.data_ptr(), packed_len=packed.numel(), qabsmax=state.absmax.data_ptr(),
                        absmax_len=state.absmax.numel(), code8=state.nested_code.data_ptr(),
                        nested=state.nested_absmax.data_ptr(), nested_len=1, nested_bs=256,
                        offset=float(state.offset), code=state.code.data_ptr(), out=out.data_ptr(),
                        out_len=out.numel(), b0=0, b1=1024, bs=64, kind=0, simd=0, nthreads=1)
    assert native._lib.loralab_dequant4(native.ctypes.byref(args)) == 5  # nested absmax too short
    for field, value, err in (("packed_len", 10, 3), ("out_len", 10, 6), ("absmax_len", 10, 4),
                              ("bs", 31, 1), ("b1", -1, 2), ("kind", 7, 7)):
        bad = native._Args.from_buffer_copy(args)
        bad.nested_len = 4
        setattr(bad, field, value)
        assert native._lib.loralab_dequant4(native.ctypes.byref(bad)) == err, field
    out.fill_(7.0)
    args.nested_len = 4
    assert native._lib.loralab_dequant4(native.ctypes.byref(args)) == 0
    assert torch.equal(out, dequantize_4bit(packed, state, torch.float32, impl="torch").reshape(-1))


@pytest.mark.parametrize("alias", ["packed", "state.absmax"])
def test_out_overlapping_an_input_is_refused(alias):
    packed, state = _state(False, shape=(4, 64))
    buf = torch.zeros(256)
    if alias == "packed":
        packed = buf.view(torch.uint8)[: packed.numel()].copy_(packed)
    else:
        state = dataclasses.replace(state, absmax=buf[:4].copy_(state.absmax))
    with pytest.raises(ValueError, match=f"out overlaps {alias}"):
        dequantize_4bit(packed, state, out=buf)


def test_empty_weight_state_dequantizes_to_empty():
    state = QuantState(absmax=torch.empty(0), shape=torch.Size((0, 64)), dtype=torch.float32,
                       blocksize=64, quant_type="nf4", code=_state(False)[1].code)
    for impl in _impls():
        got = dequantize_4bit(torch.empty(0, dtype=torch.uint8), state, impl=impl)
        assert got.shape == (0, 64) and got.dtype == torch.float32


# ---- from_dict: a file is untrusted input ---------------------------------------------------

def _dict(**changes):
    d = _state(True)[1].to_dict()
    d.update(changes)
    return d


FROM_DICT = {
    "nested_blocksize_-1": (_dict(nested_blocksize=torch.tensor([-1])), ValueError, "nested_blocksize"),
    "nested_blocksize_float": (_dict(nested_blocksize=torch.tensor([256.5])), TypeError, "nested_blocksize"),
    "nested_blocksize_empty": (_dict(nested_blocksize=torch.tensor([], dtype=torch.int64)), ValueError,
                               "nested_blocksize"),
    "blocksize_float": (_dict(blocksize=torch.tensor([64.9])), TypeError, "blocksize"),
    "shape_float": (_dict(shape=torch.tensor([3.0, 640.0])), TypeError, "shape"),
    "shape_2d": (_dict(shape=torch.tensor([[3, 640]])), ValueError, "shape"),
    "dtype_int64": (_dict(dtype=torch.tensor(list(b"int64"), dtype=torch.uint8)), ValueError, "dtype"),
    "quant_type_not_ascii": (_dict(quant_type=torch.tensor([200, 201], dtype=torch.uint8)), ValueError,
                             "quant_type"),
    "nested_absmax_one_value": (_dict(nested_absmax=torch.ones(1)), ValueError, "nested_absmax"),
    "absmax_not_tensor": (_dict(absmax=[1, 2, 3]), TypeError, "absmax"),
}


@pytest.mark.parametrize("case", sorted(FROM_DICT))
def test_from_dict_validates(case):
    d, exc, field = FROM_DICT[case]
    with pytest.raises(exc, match=field):
        QuantState.from_dict(d)


def test_from_dict_round_trip_is_exact():
    packed, state = _state(True)
    back = QuantState.from_dict(state.to_dict())
    assert torch.equal(dequantize_4bit(packed, back), dequantize_4bit(packed, state))


# ---- C. LinearNF4 and the other silent-damage family members -------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_linear_refuses_non_float_input(dtype):
    layer = LinearNF4(64, 8)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor"):
        layer(torch.ones(2, 64).to(dtype))


def test_linear_float64_input_is_computed_in_compute_dtype():
    layer = LinearNF4(64, 8, compute_dtype=torch.float32)
    x = torch.randn(3, 64, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    assert torch.equal(y, layer(x.float()).double())  # exactly the float32 computation


def test_linear_refuses_scalar_input():
    with pytest.raises(ValueError, match="x must have last dimension in_features=64"):
        LinearNF4(64, 8)(torch.tensor(1.0))


def _dq_layer():
    return LinearNF4(64, 8, weight=torch.randn(8, 64, generator=torch.Generator().manual_seed(3)))


LOAD_CASES = {  # name: (change to the state dict, field named)
    "absmax_as_float": (lambda sd: sd.update(absmax=sd["absmax"].float()), "absmax"),
    "absmax_short": (lambda sd: sd.update(absmax=sd["absmax"][:-1]), "absmax"),
    "weight_packed_int8": (lambda sd: sd.update(weight_packed=sd["weight_packed"].to(torch.int8)), "weight_packed"),
    "nested_absmax_shape": (lambda sd: sd.update(nested_absmax=torch.ones(2)), "nested_absmax"),
    "offset_float64": (lambda sd: sd.update(offset=sd["offset"].double()), "offset"),
    "offset_nan": (lambda sd: sd.update(offset=torch.tensor(float("nan"))), "offset"),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_load_state_dict_refuses_before_changing_anything(case):
    tamper, field = LOAD_CASES[case]
    layer = _dq_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    sd = {k: v.clone() for k, v in _dq_layer().state_dict().items()}
    sd["weight_packed"].bitwise_not_()  # a different weight, so a partial load would show
    tamper(sd)
    with pytest.raises(ValueError, match=field):
        layer.load_state_dict(sd)
    after = layer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_load_state_dict_of_a_valid_layer_is_exact():
    source, layer = _dq_layer(), LinearNF4(64, 8)
    layer.load_state_dict(source.state_dict())
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), source(x))


def test_linear_weight_errors_name_weight():
    with pytest.raises(TypeError, match="weight must have dtype float32"):
        LinearNF4(64, 8, weight=torch.randn(8, 64, dtype=torch.float64))
    layer = LinearNF4(64, 8)
    with pytest.raises(TypeError, match="weight must have dtype"):
        layer.set_weight(torch.ones(8, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="device='meta' differs from weight's device cpu"):
        LinearNF4(64, 8, weight=torch.randn(8, 64), device="meta")


def test_meta_tensors_give_meta_results_not_item_errors():
    layer = LinearNF4(64, 8, device="meta")  # quantizing a meta weight: shapes only
    assert layer.weight_packed.device.type == "meta" and layer.absmax.shape == (8,)
    packed = pack_nibbles(torch.zeros(6, dtype=torch.uint8, device="meta"))
    assert packed.device.type == "meta" and packed.shape == (3,)


BLOCKWISE_8BIT = {
    "quantize_blocksize_0": (lambda: quantize_blockwise_8bit(torch.randn(10), blocksize=0), ValueError, "blocksize"),
    "quantize_blocksize_bool": (lambda: quantize_blockwise_8bit(torch.randn(10), blocksize=True), ValueError,
                                "blocksize"),
    "quantize_code_short": (lambda: quantize_blockwise_8bit(torch.randn(10), code=torch.zeros(10)), ValueError,
                            "code"),
    "quantize_int_x": (lambda: quantize_blockwise_8bit(torch.ones(10, dtype=torch.int64)), TypeError, "x"),
    "quantize_nan_x": (lambda: quantize_blockwise_8bit(torch.tensor([1.0, float("nan")])), ValueError, "x"),
    "dequantize_blocksize_0": (lambda: dequantize_blockwise_8bit(torch.zeros(10, dtype=torch.uint8),
                                                                 torch.ones(1), blocksize=0), ValueError, "blocksize"),
    "dequantize_absmax_short": (lambda: dequantize_blockwise_8bit(torch.zeros(600, dtype=torch.uint8),
                                                                  torch.ones(2)), ValueError, "absmax"),
    "dequantize_absmax_empty": (lambda: dequantize_blockwise_8bit(torch.zeros(10, dtype=torch.uint8),
                                                                  torch.ones(0)), ValueError, "absmax"),
    "dequantize_q_float": (lambda: dequantize_blockwise_8bit(torch.zeros(10), torch.ones(1)), TypeError, "q"),
    "unpack_numel_float": (lambda: unpack_nibbles(torch.zeros(2, dtype=torch.uint8), 3.0), ValueError, "numel"),
    "quantize_4bit_double_quant_str": (lambda: quantize_4bit(torch.randn(64), double_quant="no"), TypeError,
                                       "double_quant"),
    "nf4_linear_blocksize_0": (lambda: loralab_kernels.nf4_linear(
        torch.randn(2, 64), *(lambda p, s: (p, dataclasses.replace(s, blocksize=0)))(*_state(True, (8, 64)))),
        ValueError, "state.blocksize"),
}


@pytest.mark.parametrize("case", sorted(BLOCKWISE_8BIT))
def test_helpers_raise_naming_the_argument(case):
    call, exc, field = BLOCKWISE_8BIT[case]
    with pytest.raises(exc, match=field):
        call()


# ---- fuzz: random tampering never crashes the process ---------------------------------------

FUZZ = r'''
import dataclasses, sys
import torch
from hypothesis import given, settings, strategies as st, HealthCheck
from quant import dequantize_4bit, native, quantize_4bit

torch.manual_seed(0)
BASE = {dq: quantize_4bit(torch.randn(5, 600), "nf4", 64, dq) for dq in (True, False)}
INTS = st.one_of(st.integers(-2**65, 2**65), st.sampled_from([0, 1, -1, 2, 31, 32, 64, 128, 255, 256,
                 257, 2**31 - 1, 2**31, 2**32 + 64, 2**63 - 1, 2**64 + 1]), st.booleans())
LENGTHS = st.integers(0, 3000)

def tensor_of(n, dtype):
    return (torch.rand(n) * 4 - 2).to(dtype) if dtype.is_floating_point else torch.randint(0, 256, (n,)).to(dtype)

DTYPES = st.sampled_from([torch.float32, torch.uint8, torch.float16, torch.float64, torch.int64])
FIELDS = {
    "blocksize": INTS, "nested_blocksize": INTS,
    "absmax": st.tuples(LENGTHS, DTYPES), "nested_absmax": st.tuples(st.integers(0, 20), DTYPES),
    "code": st.tuples(st.integers(0, 40), DTYPES), "nested_code": st.tuples(st.integers(0, 300), DTYPES),
    "offset": st.sampled_from([0.0, float("nan"), float("inf"), -1e38, None]),
    "shape": st.lists(st.integers(-5, 4000), min_size=0, max_size=3),
    "packed": LENGTHS,
}
calls = {"raised": 0, "equal": 0}

@settings(max_examples=int(sys.argv[1]), deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.booleans(), st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True), st.data(),
       st.sampled_from(["auto", "native", "torch"]), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def fuzz(dq, fields, data, impl, dtype):
    packed, state = BASE[dq]
    changes = {}
    for f in fields:
        if data.draw(st.booleans(), label=f"keep {f}"):  # some valid states too, to compare results
            continue
        v = data.draw(FIELDS[f], label=f)
        if f == "packed":
            packed = torch.randint(0, 256, (v,), dtype=torch.uint8)
        elif f in ("absmax", "nested_absmax", "code", "nested_code"):
            changes[f] = tensor_of(*v)
        elif f == "offset":
            changes[f] = None if v is None else torch.tensor(v)
        elif f == "shape":
            changes[f] = torch.Size([max(0, s) for s in v]) if all(s >= 0 for s in v) else tuple(v)
        else:
            changes[f] = v
    bad = dataclasses.replace(state, **changes)
    if impl == "native" and not native.available():
        impl = "auto"
    try:
        got = dequantize_4bit(packed, bad, dtype, impl=impl)
    except (ValueError, TypeError):
        calls["raised"] += 1
        return
    # Accepted: it must be a consistent state, and the C loop must agree with PyTorch.
    ref = dequantize_4bit(packed, bad, dtype, impl="torch")
    assert torch.equal(got, ref), (fields, changes)
    calls["equal"] += 1

fuzz()
print(calls["raised"], calls["equal"])
'''


def test_fuzzed_states_never_crash_the_process(golden):
    env = {**os.environ, "LORALAB_CACHE": str(golden)}
    res = subprocess.run([sys.executable, "-c", FUZZ, "200"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, f"signal or failure (rc {res.returncode}):\n{res.stderr[-3000:]}"
    raised, equal = map(int, res.stdout.split())
    assert raised + equal == 200 and raised > 50 and equal > 20, (raised, equal)
