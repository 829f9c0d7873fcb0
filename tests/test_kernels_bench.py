"""`benchmarks/gpu_check.py` (the script for a lent GPU) dry-runs on the CPU: the CUDA tests
skip, and `benchmarks/kernel_speed.py --smoke` runs its whole code path under the interpreter and
writes its CSV, plot and chosen tiles."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_csv_and_plot(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                          "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "skipped" in (tmp_path / "gpu_tests.log").read_text()
    tmp_path = tmp_path / "smoke"
    assert "0 failed or skipped measurements" in out.stdout, out.stdout[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "kernels.csv")))
    metrics = {r["metric"] for r in rows}
    for m in ("bandwidth", "dequant_copy_fraction", "gemv_speedup_vs_bf16",
              "gemv_speedup_vs_dequant_matmul", "gemm_ratio_vs_bf16",
              "qlora_speedup_vs_dequant(triton)+matmul"):
        assert m in metrics, m
    assert all(float(r["value"]) > 0 for r in rows)
    assert (tmp_path / "kernels.png").stat().st_size > 10_000
    assert (tmp_path / "kernels_configs.json").exists()
