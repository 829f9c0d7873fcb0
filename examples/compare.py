"""`make compare`: every method on the same task, data and step budget, one table and a chart.

Each method runs in its own process (`finetune.py --method M --json ...`) so that its
peak memory is its own. In-context learning (zero-, one-, few-shot) changes no weight;
full fine-tuning, LoRA and QLoRA train for the same steps on the same batches.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import write_rows
from examples.methods import METHODS
from examples.report import MB, fmt_bytes, pct, rows_of, save_figure

COLORS = {"full": "#c44", "lora": "#48c", "qlora": "#4a4", "adapter": "#c8c", "prompt": "#c93"}  # ICL bars grey
PASSED = ("task", "steps", "batch_size", "r", "alpha", "dropout", "n_train", "n_eval", "shots",
          "eval_batch", "compute_dtype", "seed", "threads")


def worker_command(cfg, method: str, json_path: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).with_name("finetune.py")), "--method", method,
           "--json", str(json_path), "--out", str(Path(cfg.out) / method), "--no-reload",
           "--show", "0"]
    for name in PASSED:
        if getattr(cfg, name) is not None:  # steps=None: the task's default
            cmd += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    if cfg.lr is not None:
        cmd += ["--lr", str(cfg.lr)]
    if cfg.data is not None:
        cmd += ["--data", cfg.data, "--eval-fraction", str(cfg.eval_fraction)]
    if cfg.grad_checkpointing:
        cmd += ["--grad-checkpointing"]
    if cfg.gguf is not None:
        cmd += ["--gguf", cfg.gguf]
    return cmd


def run_method(cfg, method: str) -> dict:
    json_path = Path(cfg.out) / f"{method}.json"
    json_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(worker_command(cfg, method, json_path))
    if proc.returncode != 0 or not json_path.exists():
        raise RuntimeError(f"method {method} failed (exit code {proc.returncode})")
    res = json.loads(json_path.read_text())
    res["total_seconds"] = time.perf_counter() - t0
    return res


def print_comparison(results: list[dict]) -> None:
    head = f"{'method':<10} {'exact':>6} {'content':>7} {'trainable':>12} {'train %':>8} {'saved':>10} " \
           f"{'peak RSS':>10} {'s/step':>7} {'total s':>8}"
    print("\nexact: held-out answers right character for character (format and content); "
          "content: fraction of JSON fields right (content only)")
    print(head + "\n" + "-" * len(head))
    for r in results:
        sps = r.get("seconds_per_step")
        print(f"{r['method']:<10} {r['acc']:>6.0%} {pct(r.get('content')):>7} {r['trainable_params']:>12,d} "
              f"{r['trainable_pct']:>8.3f} {fmt_bytes(r['saved_bytes']):>10} "
              f"{r['peak_rss_bytes'] / MB:>7,.0f} MB {'-' if sps is None else f'{sps:.2f}':>7} "
              f"{r['total_seconds']:>8.0f}")
    by = {r["method"]: r for r in results}
    if "lora" in by and "qlora" in by:
        lo, q = by["lora"], by["qlora"]
        print(f"\nQLoRA / LoRA: block weights {q['base_stored_bytes'] / lo['base_stored_bytes']:.3f}x, "
              f"peak RSS {q['peak_rss_bytes'] / lo['peak_rss_bytes']:.2f}x, "
              f"time per step {q['seconds_per_step'] / lo['seconds_per_step']:.2f}x")
    if "full" in by and "lora" in by:
        f, lo = by["full"], by["lora"]
        print(f"LoRA / full fine-tuning: trainable parameters {lo['trainable_params'] / f['trainable_params']:.4f}x, "
              f"saved bytes {lo['saved_bytes'] / f['saved_bytes']:.4f}x, "
              f"peak RSS {lo['peak_rss_bytes'] / f['peak_rss_bytes']:.2f}x, "
              f"time per step {lo['seconds_per_step'] / f['seconds_per_step']:.2f}x")


def bar_chart(results: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in results]
    panels = [("held-out exact match", [r["acc"] for r in results], "{:.0%}"),
              ("held-out content (JSON fields)", [r.get("content") or 0.0 for r in results], "{:.0%}"),
              ("peak RSS (MB)", [r["peak_rss_bytes"] / MB for r in results], "{:,.0f}"),
              ("saved (MB)", [r["saved_bytes"] / MB for r in results], "{:,.1f}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.8))
    for ax, (title, values, fmt) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=[COLORS.get(n, "#999") for n in names])
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"SmolLM2-135M-Instruct, {results[0].get('task_name', 'JSON extraction')}, same data and steps",
                 y=1.03)  # above the panel titles
    save_figure(fig, path)
    plt.close(fig)
    return path


def compare(cfg, methods: list[str] | None = None) -> int:
    methods = methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    for method in methods:
        print(f"\n### {method}", flush=True)
        try:
            results.append(run_method(cfg, method))
        except RuntimeError as e:  # keep the other methods' figures
            print(f"error: {e}", file=sys.stderr)
            failed.append(method)
    if not results:
        return 2
    print_comparison(results)
    rows = [row for r in results for row in rows_of(r, benchmark="finetune_compare")]
    print(f"\ncsv: {write_rows(out / 'compare.csv', rows)}\nchart: {bar_chart(results, out / 'compare.png')}")
    if failed:
        print(f"failed: {', '.join(failed)} (see the errors above)", file=sys.stderr)
    return 1 if failed else 0
