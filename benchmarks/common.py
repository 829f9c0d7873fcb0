"""Shared helpers for the benchmark scripts: tidy CSV rows, timing, environment facts.

Every benchmark appends rows with the columns in `COLUMNS` to a CSV under
`benchmarks/results/` (one file per benchmark, rewritten atomically each run), and
draws its plots from those rows. Peers are measured in the same run and ratios are
reported, because these machines are noisy.
"""
from __future__ import annotations

import csv
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from quant.atomic_file import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = ["benchmark", "provider", "shape", "metric", "value", "unit",
           "device", "torch", "triton", "commit"]


def device_name(device: str | torch.device = "cpu") -> str:
    """A human-readable name of the device the numbers were measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "none"


def make_row(benchmark: str, provider: str, shape: str, metric: str, value: float, unit: str,
             device: str | torch.device = "cpu") -> dict:
    """One tidy CSV row, with the environment columns filled in."""
    return {"benchmark": benchmark, "provider": provider, "shape": shape, "metric": metric,
            "value": value, "unit": unit, "device": device_name(device),
            "torch": torch.__version__, "triton": _triton_version(), "commit": _git_commit()}


def write_rows(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write rows to a CSV atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
    atomic_write(path, write)
    return path


def read_rows(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def time_cpu(fn: Callable[[], object], warmup: int = 2, repeat: int = 7) -> float:
    """Median wall time of `fn()` in seconds (CPU; use triton.testing.do_bench on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
