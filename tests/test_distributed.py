"""LoRA/QLoRA on several processes: `torchrun --nproc_per_node=2` with gloo on the CPU.

One torchrun launch trains LoRA and QLoRA with DDP and with FSDP2 (`fully_shard`); this
process trains the same configs on one process with the same global batch. The adapters
must agree within float tolerance, and DDP must all-reduce the adapter gradients only.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lora import read_adapter

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_distributed.py"
STEPS, GLOBAL_BATCH = 3, 8
METHODS, MODES = ("lora", "qlora"), ("ddp", "fsdp")
ATOL = RTOL = 1e-5  # float32; DDP's bucketed mean of two half-batch gradients vs one full-batch sum


def load_script():
    spec = importlib.util.spec_from_file_location("train_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not built in")


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           "--out", str(out), "--methods", ",".join(METHODS), "--modes", ",".join(MODES),
           "--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def single_process():
    """(adapter tensors by key, metrics) of one-process runs with the same global batch."""
    script = load_script()
    runs = {}
    for method in METHODS:
        cfg = script.TrainConfig(method=method, steps=STEPS, global_batch=GLOBAL_BATCH)
        model, metrics = script.train(cfg)
        tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs[method] = (tensors, metrics)
    return runs


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    _, tensors = read_adapter(directory)
    # file key "model.layers.0.self_attn.q_proj.lora_A.weight" <- parameter "...lora_A.default.weight"
    return tensors


def param_to_file_key(name: str) -> str:
    return name.replace(".default.", ".")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_multi_process_equals_one_process(torchrun_out, single_process, method, mode):
    reference, ref_metrics = single_process[method]
    found = file_tensors(torchrun_out / f"{method}-{mode}")
    assert set(found) == {param_to_file_key(n) for n in reference}
    trained_b = [n for n in reference if ".lora_B." in n]
    assert trained_b and all(reference[n].abs().max() > 0 for n in trained_b), "training did not move B"
    for name, ref in reference.items():
        torch.testing.assert_close(found[param_to_file_key(name)], ref, atol=ATOL, rtol=RTOL, msg=name)
    metrics = json.loads((torchrun_out / f"{method}-{mode}.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["losses"] == pytest.approx(ref_metrics["losses"], abs=1e-5)
    assert metrics["losses"][-1] < metrics["losses"][0]


@pytest.mark.parametrize("method", METHODS)
def test_ddp_communicates_adapter_gradients_only(torchrun_out, single_process, method):
    metrics = json.loads((torchrun_out / f"{method}-ddp.json").read_text())
    reference, _ = single_process[method]
    adapter_bytes = sum(t.numel() * t.element_size() for t in reference.values())
    assert metrics["trainable_bytes"] == adapter_bytes
    # every step all-reduces each adapter gradient exactly once, and nothing else
    assert metrics["allreduce_bytes"] == adapter_bytes * STEPS
    # full fine-tuning would all-reduce every parameter (4 bytes each in float32)
    assert metrics["trainable_params"] * 4 == adapter_bytes < metrics["all_params"] * 4
    print(f"{method}: {metrics['allreduce_bytes']:,d} bytes all-reduced in {STEPS} steps "
          f"({metrics['allreduce_buckets']} buckets); model state {metrics['model_bytes']:,d} bytes")


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_reduces_adapter_gradients_only(torchrun_out, single_process, method):
    """FSDP2 gathers the (frozen) base to compute, but reduce-scatters adapter gradients only."""
    metrics = json.loads((torchrun_out / f"{method}-fsdp.json").read_text())
    reference, _ = single_process[method]
    adapter_bytes = sum(t.numel() * t.element_size() for t in reference.values())
    assert metrics["fsdp_reduce_scatter_bytes"] == adapter_bytes * STEPS
    assert metrics["fsdp_all_gather_bytes"] > adapter_bytes * STEPS
    print(f"{method}-fsdp: all-gathered {metrics['fsdp_all_gather_bytes']:,d} bytes, reduce-scattered "
          f"{metrics['fsdp_reduce_scatter_bytes']:,d} in {STEPS} steps")
