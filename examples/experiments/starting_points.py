"""Where should an adapter on a quantized base start? B = 0, LoftQ or QPiSSA on NF4/NF3/NF2.

    python examples/experiments/starting_points.py                 # the grid, 1 seed (10 runs of 3-6 min)
    python examples/experiments/starting_points.py --seeds 0 1 2   # more seeds for the noise
    python examples/experiments/starting_points.py --plot          # only rebuild CSV + PNG from the runs
    python examples/experiments/starting_points.py --quick         # a smoke run (tiny, not for the docs)

The demo task of `examples/finetune.py` (JSON extraction, 400 generated training examples,
100 held-out, 15 AdamW steps of 8 at lr 1e-3, LoRA r = 16, alpha = 32 on every linear layer
of the blocks, seed 0), run with the block linears stored as NF4, NF3 or NF2 (blocksize 64,
double quantization; NF3/NF2 are stored in the 4-bit format) and the adapter started as:

* "zero": QLoRA's B = 0 (kaiming A): the model starts as the quantized model;
* "loftq": LoftQ (Li et al. 2023, Algorithm 1, `loftq_iter` steps, PEFT's default 1),
  through `apply_lora(..., LoRAConfig(init="loftq", loftq_bits=b))`;
* "pissa": QPiSSA (Meng et al. 2024, sec. 4): PiSSA's factors from the full-precision
  weight, the residual quantized as the frozen base (`lora.init.qpissa` per layer).

plus the unquantized reference (the demo's `--method lora`: float32 base, B = 0). Each run
scores held-out exact match and content score before training (quantized base + the
initialized, untrained adapter) and after, and records the loss of every step and the
reconstruction error `||W - (dequant(Q) + s B A)||_F / ||W||_F` over all block linears.

Each run writes one JSON under runs/experiments/starting_points/ (so an interrupted grid
resumes, and two processes can share it with `--shard i/n`); `--plot` (and the end of a
grid) gathers them into docs/figures/starting_points.csv, starting_points_loss.csv and
starting_points.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import lora.qlora  # noqa: F401  (registers QLoRALinear for the 4-bit base)
from examples.finetune import generation_budget
from examples.methods import NF4_SETTINGS, block_linears, load_model, lora_config, start_lora
from examples.report import atomic_write_text, save_figure
from examples.task import make_splits
from examples.training import TrainConfig, evaluate_scores, train
from lora.init import LOFTQ_QUANT_TYPES
from quant import Linear4bit
from quant.codes import code_revision

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures"  # committed CSV + PNG
RUNS = ROOT / "runs" / "experiments"  # one JSON per finished run (not committed)
OUT = RUNS / "starting_points"
BASES = ("nf4", "nf3", "nf2")
INITS = ("zero", "loftq", "pissa")
REFERENCE = ("fp32", "zero")  # the unquantized LoRA run (the demo's --method lora)


@dataclass
class GridConfig:
    """The demo's recipe (examples/finetune.py defaults for --task extract)."""

    steps: int = 15  # the demo's optimizer steps on "extract"
    batch_size: int = 8
    lr: float = 1e-3  # DEFAULT_LR["qlora"]
    r: int = 16
    alpha: float = 32  # scaling alpha / r = 2
    n_train: int = 400
    n_eval: int = 100
    eval_batch: int = 100  # prompts per generate() call, as the demo
    loftq_iter: int = 1  # PEFT's LoftQConfig default; benchmarks/init_error.py measures 1 vs 5
    blocksize: int = 64  # QLoRA sec. 3
    double_quant: bool = True


def build(model: nn.Module, cfg: GridConfig, base: str, init: str) -> None:
    """Quantize the block linears to `base` and start the adapters with `init`, in place
    (`examples.methods.start_lora`, the path of `finetune.py --init ... --bits ...`)."""
    if (cfg.blocksize, cfg.double_quant) != (NF4_SETTINGS["blocksize"], NF4_SETTINGS["double_quant"]):
        raise ValueError("the grid's base uses examples.methods.NF4_SETTINGS' blocksize and double quantization")
    config = lora_config(cfg.r, cfg.alpha, 0.0, "kaiming" if init == "zero" else init)
    bits = None if base == "fp32" else {v: k for k, v in LOFTQ_QUANT_TYPES.items()}[base]
    start_lora(model, config, bits, torch.float32, cfg.loftq_iter)


@torch.no_grad()
def reconstruction_error(model: nn.Module, originals: dict[str, torch.Tensor]) -> float:
    """`sqrt(sum ||W - (base + s B A)||^2 / sum ||W||^2)` over the block linears (float64)."""
    num = den = 0.0
    for name, layer in block_linears(model):
        base = layer.base_layer
        W0 = base.dequantize(torch.float32) if isinstance(base, Linear4bit) else base.weight
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        approx = W0.double() + layer.scaling["default"] * (B.double() @ A.double())
        W = originals[name].double()
        num += float((W - approx).pow(2).sum())
        den += float(W.pow(2).sum())
    return math.sqrt(num / den)


def run_one(cfg: GridConfig, base: str, init: str, seed: int) -> dict:
    torch.manual_seed(seed)
    train_set, eval_set = make_splits(cfg.n_train, cfg.n_eval, seed)
    model, tok = load_model("lora")  # float32 weights; quantized below
    originals = {n: m.weight.detach().clone() for n, m in block_linears(model)}
    t0 = time.perf_counter()
    build(model, cfg, base, init)
    init_s = time.perf_counter() - t0
    row = {"base": base, "init": init, "seed": seed, "init_seconds": init_s,
           "code_revision": code_revision(base) if base != "fp32" else 1,
           "recon_error": reconstruction_error(model, originals), **asdict(cfg)}
    del originals
    eval_kw = dict(batch_size=cfg.eval_batch, max_new_tokens=generation_budget(tok, eval_set))
    scored, _ = evaluate_scores(model, tok, eval_set, desc=f"{base}/{init} eval before", **eval_kw)
    row.update(exact_before=scored["exact"], content_before=scored["content"])
    t0 = time.perf_counter()
    result = train(model, tok, train_set, TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                                      seed=seed), desc=f"{base}/{init} seed {seed}")
    row["train_seconds"] = time.perf_counter() - t0
    scored, _ = evaluate_scores(model, tok, eval_set, desc=f"{base}/{init} eval after", **eval_kw)
    row.update(exact_after=scored["exact"], content_after=scored["content"], losses=result.losses)
    return row


def grid(bases, inits, seeds, reference: bool) -> list[tuple[str, str, int]]:
    runs = [(b, i, s) for s in seeds for b in bases for i in inits]
    return runs + ([(*REFERENCE, s) for s in seeds] if reference else [])


def run_path(out: Path, base: str, init: str, seed: int) -> Path:
    """One JSON per run; a base whose code book changed (quant.codes.CODE_REVISION) gets its
    revision in the name, so runs with the earlier code stay apart and are never resumed into."""
    revision = code_revision(base) if base != "fp32" else 1
    return out / f"{base}{f'.code{revision}' if revision > 1 else ''}_{init}_seed{seed}.json"


def base_label(row: dict) -> str:
    """"NF3" for the current code book; "NF3 (code 1)" for a run with an earlier revision
    (runs written before revisions were recorded used revision 1)."""
    revision = row.get("code_revision", 1)
    current = code_revision(row["base"]) if row["base"] != "fp32" else 1
    return row["base"].upper() + ("" if revision == current else f" (code {revision})")


def collect(out: Path, figures: Path) -> list[dict]:
    """All finished runs -> the two CSVs and the figure; returns the rows."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not rows:
        return rows
    figures.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.setdefault("code_revision", 1)
    keys = ["base", "code_revision", "init", "seed", "exact_before", "content_before", "exact_after", "content_after",
            "recon_error", "init_seconds", "train_seconds", "steps", "loftq_iter", "r", "alpha"]
    _write_csv(figures / "starting_points.csv", keys, rows)
    loss_rows = [{"base": r["base"], "code_revision": r["code_revision"], "init": r["init"], "seed": r["seed"],
                  "step": i + 1, "loss": loss}
                 for r in rows for i, loss in enumerate(r["losses"])]
    _write_csv(figures / "starting_points_loss.csv", ["base", "code_revision", "init", "seed", "step", "loss"],
               loss_rows)
    plot(rows, figures / "starting_points.png")
    print(summary(rows))
    return rows


def summary(rows: list[dict]) -> str:
    """A markdown table: mean (and range over seeds) of each configuration's scores."""
    def stat(runs, key):
        vals = [r[key] for r in runs]
        mean = statistics.mean(vals)
        return f"{mean:.2f}" if len(vals) == 1 else f"{mean:.2f} ({min(vals):.2f}-{max(vals):.2f})"

    lines = ["| base | init | seeds | rel. error of base + s B A | exact before | content before | "
             "exact after | content after | loss, last 5 steps |", "|---" * 9 + "|"]
    for label in labels(rows):
        for init in INITS:
            runs = [r for r in rows if base_label(r) == label and r["init"] == init]
            if not runs:
                continue
            tail = statistics.mean(statistics.mean(r["losses"][-5:]) for r in runs)
            lines.append(f"| {label} | {init} | {len(runs)} | {statistics.mean(r['recon_error'] for r in runs):.4f} | "
                         f"{stat(runs, 'exact_before')} | {stat(runs, 'content_before')} | "
                         f"{stat(runs, 'exact_after')} | {stat(runs, 'content_after')} | {tail:.4f} |")
    return "\n".join(lines)


def labels(rows: list[dict]) -> list[str]:
    """The base labels present, in BASES order (current code first), then FP32."""
    present = {base_label(r) for r in rows}
    order = [label for base in list(BASES) + ["fp32"] for label in sorted(
        (x for x in present if x.split(" ")[0] == base.upper()), key=len)]
    return order


def _write_csv(path: Path, keys: list[str], rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = [b for b in labels(rows) if b != "FP32"]
    fig, axes = plt.subplots(1, len(bases) + 1, figsize=(4.2 * (len(bases) + 1), 3.6), sharey=False)
    colors = {"zero": "tab:blue", "loftq": "tab:orange", "pissa": "tab:green"}
    ref = [r for r in rows if r["base"] == "fp32"]
    for ax, base in zip(axes[:-1], bases, strict=True):
        for init in INITS:
            runs = [r for r in rows if base_label(r) == base and r["init"] == init]
            for k, r in enumerate(runs):
                ax.plot(range(1, len(r["losses"]) + 1), r["losses"], color=colors[init], alpha=0.8,
                        label=init if k == 0 else None)
        for k, r in enumerate(ref):
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], color="gray", ls="--", alpha=0.8,
                    label="fp32 LoRA" if k == 0 else None)
        ax.set_yscale("log")
        ax.set_title(f"{base} base: training loss")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    ax = axes[-1]
    names, bars = [], {"content before training": [], "exact match after": [], "content after": []}
    keys = {"content before training": "content_before", "exact match after": "exact_after",
            "content after": "content_after"}
    for base in bases + ["FP32"]:
        for init in INITS:
            runs = [r for r in rows if base_label(r) == base and r["init"] == init]
            if runs:
                names.append(f"{base}\n{init}")
                for name, key in keys.items():
                    bars[name].append(statistics.mean(r[key] for r in runs))
    for k, (name, vals) in enumerate(bars.items()):
        ax.bar([i + (k - 1) * 0.27 for i in range(len(names))], vals, width=0.27, label=name)
    ax.set_xticks(list(range(len(names))), names, fontsize=6)
    ax.set_ylabel("held-out score (mean over seeds)")
    ax.set_title("100 held-out sentences")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    p.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS))
    p.add_argument("--no-reference", action="store_true", help="skip the unquantized LoRA run")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th configuration starting at i")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--plot", action="store_true", help="only gather finished runs into CSV + PNG")
    p.add_argument("--quick", action="store_true", help="tiny smoke run under runs/ (not the docs' figures)")
    args = p.parse_args(argv)
    cfg, out, figures = GridConfig(), OUT, FIGURES
    if args.quick:
        cfg = GridConfig(steps=2, n_train=16, n_eval=4, eval_batch=4, r=4, alpha=8)
        out = figures = RUNS / "starting_points_quick"
        args.bases, args.inits = ["nf4", "nf2"], list(INITS)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.plot:
        i, n = (int(v) for v in args.shard.split("/"))
        out.mkdir(parents=True, exist_ok=True)
        todo = grid(args.bases, args.inits, args.seeds, not args.no_reference)[i::n]
        for base, init, seed in todo:
            path = run_path(out, base, init, seed)
            if path.exists():
                continue
            row = run_one(cfg, base, init, seed)
            atomic_write_text(path, json.dumps(row))
            print(f"{base:5s} {init:6s} seed {seed}: recon {row['recon_error']:.4f}  exact "
                  f"{row['exact_before']:.2f} -> {row['exact_after']:.2f}  content "
                  f"{row['content_before']:.2f} -> {row['content_after']:.2f}  final loss {row['losses'][-1]:.4f}",
                  flush=True)
    collect(out, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
