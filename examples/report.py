"""Tables, CSV rows and plots of the fine-tuning runs (matplotlib with the Agg backend)."""
from __future__ import annotations

from pathlib import Path

from benchmarks.common import make_row, write_rows
from lora.memory import fmt_bytes
from quant.atomic_file import atomic_write, atomic_write_bytes

MB = 1024 ** 2


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically (`quant.atomic_file`), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure atomically as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    return path


def loss_plot(losses: list[float], title: str, path: Path,
              eval_losses: list[tuple[int, float]] = ()) -> Path:
    """Training loss per step and, when measured, held-out loss at some steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, marker=".", label="training batch")
    if eval_losses:
        steps, values = zip(*eval_losses, strict=True)
        ax.plot(steps, values, marker="o", label="held-out")
        ax.legend()
    ax.set(xlabel="step", ylabel="loss (answer tokens)", title=title, yscale="log")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)
    return path


def pct(x: float | None) -> str:
    """A score as a percentage; None (no JSON fields to score) as n/a."""
    return "n/a" if x is None else f"{x:.0%}"


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def rows_of(res: dict, benchmark: str = "finetune") -> list[dict]:
    """Tidy CSV rows (benchmarks/common.py columns) of one run."""
    shape = f"steps={res.get('steps', 0)}"
    metrics = [("accuracy_before", res["acc_before"], "fraction"), ("accuracy", res["acc"], "fraction"),
               ("trainable_params", res["trainable_params"], "count"),
               ("trainable_pct", res["trainable_pct"], "%"),
               ("saved_bytes", res["saved_bytes"], "bytes"),
               ("base_bf16_bytes", res["base_bf16_bytes"], "bytes"),
               ("base_stored_bytes", res["base_stored_bytes"], "bytes"),
               ("peak_rss_bytes", res["peak_rss_bytes"], "bytes"),
               ("seconds_per_step", res.get("seconds_per_step", float("nan")), "s"),
               ("eval_seconds", res["eval_seconds"], "s")]
    if "total_seconds" in res:
        metrics.append(("total_seconds", res["total_seconds"], "s"))
    if "acc_reloaded" in res:
        metrics.append(("accuracy_reloaded", res["acc_reloaded"], "fraction"))
    for key, metric in (("content_before", "content_before"), ("content", "content"),
                        ("content_reloaded", "content_reloaded")):
        if res.get(key) is not None:
            metrics.append((metric, res[key], "fraction"))
    return [make_row(benchmark, res["method"], shape, m, v, u) for m, v, u in metrics]


def report(res: dict, out: Path) -> None:
    """Print the demo's table and example generations; write the PNG and CSV."""
    n = len(res["examples"])
    n_eval = res.get("n_eval", res["config"]["n_eval"])
    print(f"\n== {res['method']}: {res.get('model_name', 'SmolLM2-135M-Instruct')}, "
          f"{res.get('task_name', 'JSON extraction')}, {n_eval} held-out examples ==")
    print("  exact match: the whole answer character for character (format and content);\n"
          "  content: the answer read as JSON, fraction of its fields right (content only)")
    rows = [("held-out exact match before / after", f"{res['acc_before']:.0%} / {res['acc']:.0%}"),
            ("held-out content before / after",
             f"{pct(res.get('content_before'))} / {pct(res.get('content'))}")]
    if "acc_reloaded" in res:
        rows.append(("after save + reload", f"{res['acc_reloaded']:.0%} exact, "
                     f"{pct(res.get('content_reloaded'))} content "
                     f"({res['same_predictions_reloaded']}/{n_eval} identical predictions)"))
    rows += [("trainable parameters", f"{res['trainable_params']:,d} of {res['all_params']:,d} "
              f"({res['trainable_pct']:.3f}%)"),
             ("block weights in bf16", fmt_bytes(res["base_bf16_bytes"])),
             ("block weights as stored", fmt_bytes(res["base_stored_bytes"]) +
              f" ({res['base_stored_bytes'] / res['base_bf16_bytes']:.3f} of their bf16 size)"),
             ("saved file(s)", fmt_bytes(res["saved_bytes"])),
             ("peak process memory (RSS)", fmt_bytes(res["peak_rss_bytes"])),
             ("seconds per step", f"{res.get('seconds_per_step', float('nan')):.2f} "
              f"(batch {res['config']['batch_size']}, {res['threads']} threads, "
              f"{res['config']['compute_dtype']} compute)"),
             ("steps, learning rate", f"{res.get('steps', 0)}, {res.get('lr', 0):g}"),
             ("training / held-out examples", f"{res.get('n_train', '?')} / {n_eval}"),
             ("prompt format", res.get("chat_format", "ChatML")),
             ("total time", f"{res['total_seconds']:.0f} s")]
    print_table(rows)
    print(f"\n{n} held-out examples (before -> after):")
    for ex in res["examples"]:
        print(f"  input:    {ex['sentence']}\n  expected: {ex['expected']}")
        print(f"  before:   {ex['before']!r}\n  after:    {ex['after']!r}\n")
    if res.get("eval_losses"):
        print("held-out loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in res["eval_losses"]))
    if res.get("losses"):
        png = loss_plot(res["losses"], f"{res['method']} on {res.get('model_name', 'SmolLM2-135M')}",
                        out / "loss.png", res.get("eval_losses", ()))
        print(f"loss curve: {png}")
    csv = write_rows(out / "finetune.csv", rows_of(res))
    print(f"figures: {csv}\nadapter: {out / 'adapter'}")
