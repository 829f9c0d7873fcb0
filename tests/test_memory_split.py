"""lora.memory computes only; the probe (live process) and the command line live beside it,
and every name stays importable from lora.memory."""
import subprocess
import sys

import lora.memory
import lora.memory_cli
import lora.memory_probe


def test_estimator_module_imports_neither_probe_nor_cli():
    code = ("import sys, lora.memory; "
            "print(sorted(m for m in ('lora.memory_probe', 'lora.memory_cli') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_moved_names_are_the_same_objects():
    for name in ("saved_activation_bytes", "tensor_bytes", "memory_usage", "print_memory_usage"):
        assert getattr(lora.memory, name) is getattr(lora.memory_probe, name)
    assert lora.memory.main is lora.memory_cli.main


def test_python_dash_m_lora_memory_still_runs():
    out = subprocess.run([sys.executable, "-m", "lora.memory", "--config", "smollm2-135m", "--method", "lora"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("SmolLM2-135M: ") and "| total |" in out.stdout


def test_one_byte_formatter():
    import examples.report

    assert examples.report.fmt_bytes is lora.memory.fmt_bytes
    assert lora.memory.fmt_bytes(512) == "512 B" and lora.memory.fmt_bytes(3 * 2**20) == "3.00 MiB"
