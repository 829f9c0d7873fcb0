"""The one prepared script for a lent GPU: the CUDA kernel tests (including
`torch.library.opcheck` of every `loralab` op on CUDA tensors), then the kernel benchmark.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out "$OUT"

Needs only the GPU image's torch, triton, pytest, matplotlib and tqdm (no install, no
network). The tests' log goes to `<out>/gpu_tests.log`; the benchmark writes
`kernels.csv`, `kernels.png` and `kernels_configs.json` there, then the mixed-adapter
section (`benchmarks/multi_adapter.py --gpu`) `multi_adapter_gpu.csv`. The benchmark runs even when
a test fails, within what is left of `--total-s` (default 420 s, under the 8-minute limit).
Without CUDA it is a dry run: the tests skip and the benchmark runs `--smoke`.
Exit status: 0 when the tests passed and the benchmark wrote rows, else 1.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_kernels_cuda.py", "tests/test_memory.py", "tests/test_kernels_segmented.py"]


def run_tests(out: Path, timeout_s: float) -> bool:
    """pytest -m cuda on the kernel tests; the log is written to out/gpu_tests.log."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *TESTS]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        log, ok = proc.stdout + proc.stderr, proc.returncode == 0
    except subprocess.TimeoutExpired as exc:
        log = f"TIMEOUT after {timeout_s:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
        ok = False
    # (found through PYTHONPATH=., see the docstring)
    from quant.atomic_file import atomic_write_bytes

    text = log if isinstance(log, str) else log.decode(errors="replace")
    atomic_write_bytes(out / "gpu_tests.log", text.encode())
    print("\n".join(str(log).splitlines()[-25:]))
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--total-s", type=float, default=420.0, help="time for tests + benchmark")
    p.add_argument("--tests-s", type=float, default=150.0, help="time limit of the test run")
    a = p.parse_args(argv)
    t0 = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
    tests_ok = run_tests(a.out, a.tests_s)
    print(f"CUDA tests: {'passed' if tests_ok else 'FAILED'} in {time.time() - t0:.0f} s")
    sys.path.insert(0, str(ROOT))
    from benchmarks import kernel_speed as bench

    left = a.total_s - (time.time() - t0)
    args = ["--out", str(a.out), "--budget-s", str(max(30.0, left - 90.0))]
    if not torch.cuda.is_available():  # a dry run of the whole script on a CPU machine
        args = ["--smoke", "--out", str(a.out / "smoke")]
    bench_rc = bench.main(args)
    # the segmented LoRA kernels (mixed-adapter batches): small, after the main benchmark
    from benchmarks import multi_adapter

    multi_out = a.out if torch.cuda.is_available() else a.out / "smoke"
    multi_rc = multi_adapter.gpu_section(multi_out, max(20.0, a.total_s - (time.time() - t0) - 30.0),
                                         smoke=not torch.cuda.is_available())
    bench_rc = bench_rc or multi_rc
    print(f"gpu_check: tests {'ok' if tests_ok else 'FAILED'}, benchmark rc {bench_rc}, "
          f"total {time.time() - t0:.0f} s")
    return 0 if (tests_ok and bench_rc == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
