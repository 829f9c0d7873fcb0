"""LoRA/QLoRA on several processes: `torchrun --nproc_per_node=2` with gloo on the CPU.

One torchrun launch trains LoRA and QLoRA with DDP and with FSDP2 (`fully_shard`), plus
DDP runs with a deliberate bug each; this process trains the same configs on one process
with the same global batch. Parity is checked where it cannot depend on the CPU's
reduction order: each step's averaged gradients, and the weights after plain SGD (Adam
divides by sqrt(v), which turns a 1e-7 rounding difference in a near-zero gradient into a
step-sized weight difference, so Adam runs are no parity test). DDP must all-reduce the
adapter gradients only.

Tolerance, from float32 arithmetic: a gradient entry comes out of a chain of at most
K = 32 dependent operations (loss, head, final norm, then per block the norms, attention
and 7 linears), each a sum of at most D = 128 products (model width 64, FFN width 128,
8 x 16 tokens per batch, vocabulary 96). A length-D sum in float32 is exact to
gamma_D ~ D * u of its terms' magnitude (u = 2**-24, Higham, "Accuracy and Stability of
Numerical Algorithms", sec. 3.1), and the errors of the K stages add to first order, so two
summation orders (one process vs two half-batches averaged) agree to
REL_TOL = K * D * u = 2.4e-4 of the tensor's largest gradient. Any of the DDP bugs the
faults inject moves gradients by the order of the gradients themselves (relative 0.9-1),
thousands of times that tolerance.
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
from safetensors.torch import load_file

from lora import read_adapter

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_distributed.py"
STEPS, GLOBAL_BATCH = 3, 8
LR = 0.5  # SGD: large enough that 3 steps lower the loss and move every A and B
METHODS, MODES = ("lora", "qlora"), ("ddp", "fsdp")
FAULTS = ("no-allreduce", "sum", "wrong-shard")
U = 2.0 ** -24  # float32 unit roundoff
K, D = 32, 128  # dependent stages, longest sum (module docstring)
REL_TOL = K * D * U  # 2.4e-4 of the tensor's largest entry


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
           "--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH), "--optimizer", "sgd",
           "--lr", str(LR), "--faults", ",".join(FAULTS)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def single_process():
    """{method: (trained adapter tensors, metrics, per-step gradients)} of one-process runs."""
    script = load_script()
    runs = {}
    for method in METHODS:
        cfg = script.TrainConfig(method=method, steps=STEPS, global_batch=GLOBAL_BATCH, optimizer="sgd", lr=LR)
        model, metrics, grads = script.train(cfg)
        tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs[method] = (tensors, metrics, grads)
    return runs


def param_to_file_key(name: str) -> str:
    # file key "model.layers.0.self_attn.q_proj.lora_A.weight" <- parameter "...lora_A.default.weight"
    return name.replace(".default.", ".")


def gradient_error(out: Path, run: str, reference: list[dict[str, torch.Tensor]]) -> float:
    """Largest |g_run - g_ref| / (REL_TOL * max|g_ref|) over every step and tensor (<= 1 passes)."""
    found = load_file(out / f"{run}-grads.safetensors")
    assert set(found) == {f"step{i}.{k}" for i, step in enumerate(reference) for k in step}
    worst = 0.0
    for i, step in enumerate(reference):
        for name, ref in step.items():
            diff = (found[f"step{i}.{name}"] - ref).abs().max().item()
            scale = ref.abs().max().item()
            if scale == 0.0:  # lora_A at step 0 (B = 0 makes its gradient exactly zero)
                assert diff == 0.0, f"step {i} {name}: expected an exact zero gradient, got {diff}"
                continue
            worst = max(worst, diff / (REL_TOL * scale))
    return worst


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_multi_process_gradients_equal_one_process(torchrun_out, single_process, method, mode):
    _, _, grads = single_process[method]
    assert any(g.abs().max() > 0 for step in grads[1:] for n, g in step.items() if ".lora_A." in n), \
        "lora_A never got a gradient: the check would not cover it"
    assert gradient_error(torchrun_out, f"{method}-{mode}", grads) <= 1.0


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("method", METHODS)
def test_parity_check_catches_ddp_bugs(torchrun_out, single_process, method, fault):
    """A missing all-reduce, a wrong averaging factor or a rank on the wrong shard fails the check."""
    _, _, grads = single_process[method]
    assert gradient_error(torchrun_out, f"{method}-ddp-{fault}", grads) > 100.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_multi_process_weights_equal_one_process(torchrun_out, single_process, method, mode):
    """After SGD, w = w0 - lr * sum of the step gradients: the weight error is at most
    lr times the sum of the gradient tolerances, plus one rounding of w per step."""
    reference, ref_metrics, grads = single_process[method]
    _, found = read_adapter(torchrun_out / f"{method}-{mode}")
    assert set(found) == {param_to_file_key(n) for n in reference}
    trained = [n for n in reference if ".lora_A." in n or ".lora_B." in n]
    assert trained and all(reference[n].abs().max() > 0 for n in trained if ".lora_B." in n), \
        "training did not move B"
    for name, ref in reference.items():
        tol = LR * sum(REL_TOL * step[name].abs().max().item() for step in grads) \
            + STEPS * U * ref.abs().max().item()
        diff = (found[param_to_file_key(name)] - ref).abs().max().item()
        assert diff <= tol, f"{name}: {diff:.3g} > {tol:.3g}"
    metrics = json.loads((torchrun_out / f"{method}-{mode}.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["losses"] == pytest.approx(ref_metrics["losses"], rel=REL_TOL)
    assert metrics["losses"][-1] < metrics["losses"][0]


@pytest.mark.parametrize("method", METHODS)
def test_ddp_communicates_adapter_gradients_only(torchrun_out, single_process, method):
    metrics = json.loads((torchrun_out / f"{method}-ddp.json").read_text())
    reference, _, _ = single_process[method]
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
    reference, _, _ = single_process[method]
    adapter_bytes = sum(t.numel() * t.element_size() for t in reference.values())
    assert metrics["fsdp_reduce_scatter_bytes"] == adapter_bytes * STEPS
    assert metrics["fsdp_all_gather_bytes"] > adapter_bytes * STEPS
    print(f"{method}-fsdp: all-gathered {metrics['fsdp_all_gather_bytes']:,d} bytes, reduce-scattered "
          f"{metrics['fsdp_reduce_scatter_bytes']:,d} in {STEPS} steps")
