"""The kernels compile for a Hopper GPU (sm_90) ahead of time, without a GPU: catches code
that the interpreter accepts but the GPU compiler rejects."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-m", "loralab_kernels.compile_check", "--arch", "90"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if "sm_90: ok" in line]
    from loralab_kernels.compile_check import variants

    assert len(lines) == len(variants()), out.stdout  # every variant, the segmented LoRA kernels too
