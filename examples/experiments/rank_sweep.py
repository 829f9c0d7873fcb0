"""Rank, targets and alpha on the main-job task (LoRA paper sec. 7.1, tables 5-6).

    python examples/experiments/rank_sweep.py            # about 15 min on 2 CPU cores

Short LoRA runs of SmolLM2-135M on the JSON-extraction task, each scored by held-out
exact match:

* rank r in {1, 2, 4, 8, 16, 64} on all linear layers of the blocks, alpha = 2r
  (scaling alpha/r = 2 fixed, the demo's value);
* r in {1, 8} on q_proj and v_proj only (the paper's targets) against all linear layers;
* alpha in {4, 16, 64} at r = 8 (scaling 0.5, 2, 8).

Writes docs/figures/rank_sweep.csv and rank_sweep.png, and keeps the r = 8 and r = 64
adapters under runs/experiments/ for `intrinsic_rank.py`.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tour_setup import FIGURES, QV, ROOT, RUNS, RunConfig, save_figure, setup_threads, short_run  # noqa: E402

from benchmarks.common import COLUMNS, make_row, write_rows  # noqa: E402


@dataclass
class SweepConfig:
    """The grid; each entry costs one short run (~1 min on 2 cores)."""

    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 64)  # LoRA table 6 tries 1..64
    qv_ranks: tuple[int, ...] = (1, 8)  # ranks also run with q/v targets only
    alphas: tuple[float, ...] = (4, 16, 64)  # at r = alpha_rank
    alpha_rank: int = 8
    keep_adapters: tuple[int, ...] = (8, 64)  # saved for the subspace comparison (LoRA sec. 7.2)


def grid(sweep: SweepConfig, base: RunConfig) -> list[tuple[str, RunConfig]]:
    """(experiment name, run config) for every run, without duplicates."""
    runs: dict[tuple, tuple[str, RunConfig]] = {}
    for r in sweep.ranks:
        runs.setdefault((r, 2.0 * r, "all"), ("rank", replace(base, r=r, alpha=2.0 * r)))
    for r in sweep.qv_ranks:
        runs.setdefault((r, 2.0 * r, "qv"), ("targets", replace(base, r=r, alpha=2.0 * r, targets=list(QV))))
    for a in sweep.alphas:
        runs.setdefault((sweep.alpha_rank, float(a), "all"),
                        ("alpha", replace(base, r=sweep.alpha_rank, alpha=float(a))))
    return list(runs.values())


def plot(rows: list[dict], path) -> None:
    acc = [r for r in rows if r["metric"] == "accuracy"]

    def pts(targets, alpha_ratio=2.0):
        sel = [r for r in acc if r["targets"] == targets and abs(r["alpha"] / r["r"] - alpha_ratio) < 1e-9]
        sel.sort(key=lambda r: r["r"])
        return [r["r"] for r in sel], [100 * r["value"] for r in sel]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for targets, style in (("all", "o-"), ("qv", "s--")):
        x, y = pts(targets)
        if x:
            ax1.plot(x, y, style, label=f"{'all linear layers' if targets == 'all' else 'q_proj, v_proj'}")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("rank r (alpha = 2r)")
    ax1.set_ylabel("held-out exact match (%)")
    ax1.set_ylim(-3, 103)
    ax1.legend()
    ax1.set_title("rank and targets")
    sel = sorted((r for r in acc if r["experiment"] == "alpha" or
                  (r["targets"] == "all" and r["r"] == 8)), key=lambda r: r["alpha"])
    seen = {}
    for r in sel:
        seen[r["alpha"]] = 100 * r["value"]
    ax2.plot(list(seen), list(seen.values()), "o-")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("alpha at r = 8 (scaling alpha/8)")
    ax2.set_ylim(-3, 103)
    ax2.set_title("alpha at fixed rank")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=RunConfig.steps)
    p.add_argument("--n-eval", type=int, default=RunConfig.n_eval)
    p.add_argument("--ranks", type=int, nargs="*", default=list(SweepConfig.ranks))
    p.add_argument("--qv-ranks", type=int, nargs="*", default=list(SweepConfig.qv_ranks))
    p.add_argument("--alphas", type=float, nargs="*", default=list(SweepConfig.alphas))
    args = p.parse_args(argv)
    if args.steps < 1 or args.n_eval < 1:
        p.error("--steps and --n-eval must be at least 1")
    threads = setup_threads()
    sweep = SweepConfig(ranks=tuple(args.ranks), qv_ranks=tuple(args.qv_ranks), alphas=tuple(args.alphas))
    base = RunConfig(steps=args.steps, n_eval=args.n_eval)
    rows, t_start = [], time.perf_counter()
    for experiment, cfg in grid(sweep, base):
        targets = "qv" if cfg.targets == QV else "all"
        keep = experiment == "rank" and cfg.r in sweep.keep_adapters
        res = short_run(cfg, RUNS / f"r{cfg.r}" if keep else None)
        shape = f"r={cfg.r},alpha={cfg.alpha:g},targets={targets},steps={cfg.steps}"
        print(f"{shape:45s} accuracy {100 * res['accuracy']:5.1f}%  final loss {res['final_loss']:.4f}  "
              f"trainable {res['trainable_params']:,}  train {res['train_seconds']:.0f} s")
        for metric, value, unit in (("accuracy", res["accuracy"], "fraction"),
                                    ("final_loss", res["final_loss"], "nats"),
                                    ("trainable_params", res["trainable_params"], "count"),
                                    ("train_seconds", res["train_seconds"], "s")):
            row = make_row("rank_sweep", "loralab", shape, metric, value, unit)
            rows.append({**row, "experiment": experiment, "r": cfg.r, "alpha": cfg.alpha, "targets": targets})
    total = time.perf_counter() - t_start
    print(f"total {total / 60:.1f} min on {threads} thread(s)")
    rows.append({**make_row("rank_sweep", "loralab", "all", "total_seconds", total, "s"),
                 "experiment": "all", "r": 0, "alpha": 0, "targets": "-"})
    write_rows(FIGURES / "rank_sweep.csv", [{k: r[k] for k in COLUMNS} for r in rows])
    plot(rows, FIGURES / "rank_sweep.png")
    print(f"wrote {(FIGURES / 'rank_sweep.csv').relative_to(ROOT)} and rank_sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
