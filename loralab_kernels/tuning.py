"""Tile configurations: the candidates for each kernel come from one function
(`candidate_configs`), the choice among them is timed once per problem size and cached,
and tests can pin one (`pin_config`) to skip the timing.

Under Triton's interpreter nothing is timed: `interpreter_config` gives one small tile,
because the interpreter's cost grows with tile count and size, not with the hardware.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

from ._backend import interpreter_enabled

KINDS = ("dequant", "gemv", "gemm", "grad_input")


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration. Each kernel reads the fields it needs."""

    block_m: int = 16  # rows of x per program; larger reuses each decoded tile more (GEMV: 1 or 16)
    block_n: int = 64  # output features per program; larger means fewer programs (less parallelism)
    block_k: int = 64  # reduction step; a power of two >= 32, any ratio to the quantization blocksize
    split_k: int = 1  # GEMV only: programs sharing one output tile along K (parallelism for small N)
    group_m: int = 8  # GEMM only: row tiles launched together so weight tiles stay in L2
    block_bytes: int = 4096  # dequant only: packed bytes per program
    num_warps: int = 4  # warps per program
    num_stages: int = 3  # software-pipelining depth of the K loop (shared memory per stage)


def _c(**kw) -> TileConfig:
    return TileConfig(**kw)


def candidate_configs(kind: str) -> list[TileConfig]:
    """The configurations tried for one kernel kind (`dequant`, `gemv`, `gemm`, `grad_input`).

    GEMV is memory-bound, so its tiles are narrow in N and long in K with split-K for
    parallelism; the GEMM tiles are the usual Hopper shapes (Triton tutorial 03).
    """
    if kind == "dequant":
        return [_c(block_bytes=b, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)]
    if kind == "gemv":
        # block_m = 1: M = 1 reduced on CUDA cores (scale once per block); 16: tl.dot (any M <= 16).
        return [_c(block_m=m, block_n=n, block_k=k, split_k=s, num_warps=w, num_stages=st)
                for n, k, w, st in ((32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 8, 3))
                for s in (1, 2, 4, 8) for m in (1, 16)]
    if kind in ("gemm", "grad_input"):
        shapes = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                  (128, 128, 128, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                  (64, 64, 64, 4, 4), (128, 128, 32, 4, 4))
        return [_c(block_m=m, block_n=n, block_k=k, num_warps=w, num_stages=st)
                for m, n, k, w, st in shapes]
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def interpreter_config(kind: str) -> TileConfig:
    """The single small tile used under `TRITON_INTERPRET=1` (fast there, covers masking)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "dequant":
        return _c(block_bytes=512, num_warps=1)
    if kind == "gemv":
        return _c(block_m=1, block_n=64, block_k=64, split_k=2)
    return _c(block_m=32, block_n=64, block_k=64)


_PINNED: dict[str, TileConfig] = {}
_CHOSEN: dict[tuple, TileConfig] = {}


@contextlib.contextmanager
def pin_config(kind: str, config: TileConfig) -> Iterator[TileConfig]:
    """Use `config` for every launch of `kind` inside the `with` block (no timing)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(config, TileConfig):
        raise TypeError(f"config must be a TileConfig, got {type(config).__name__}")
    previous = _PINNED.get(kind)
    _PINNED[kind] = config
    try:
        yield config
    finally:
        if previous is None:
            _PINNED.pop(kind, None)
        else:
            _PINNED[kind] = previous


def pinned_config(kind: str) -> TileConfig | None:
    return _PINNED.get(kind)


def pick_config(kind: str, key: tuple, launch: Callable[[TileConfig], object],
                valid: Callable[[TileConfig], bool] = lambda c: True) -> TileConfig:
    """The configuration for one problem: pinned, else interpreter default, else the fastest
    valid candidate (timed once per `key` with `triton.testing.do_bench`, then cached).

    Args:
        kind: kernel kind, one of `KINDS`.
        key: what the best tile depends on (sizes, dtypes, flags).
        launch: runs the kernel once with a given config.
        valid: filters candidates that do not fit the problem.
    """
    pinned = _PINNED.get(kind)
    if pinned is not None:
        return pinned
    if interpreter_enabled():
        return interpreter_config(kind)
    full_key = (kind,) + tuple(key)
    if full_key in _CHOSEN:
        return _CHOSEN[full_key]
    from triton.testing import do_bench

    best, best_ms, errors = None, float("inf"), []
    candidates = [c for c in candidate_configs(kind) if valid(c)] or candidate_configs(kind)
    for cfg in candidates:
        try:
            ms = do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20)
        except Exception as exc:  # out of shared memory / registers for this tile: skip it
            errors.append(f"{cfg}: {type(exc).__name__}: {exc}")
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no {kind} configuration ran for {key}:\n" + "\n".join(errors))
    _CHOSEN[full_key] = best
    return best


def chosen_configs() -> dict[tuple, TileConfig]:
    """The tuned choices so far (for benchmarks to report)."""
    return dict(_CHOSEN)

