"""The tour's figures that need no training: NF4 levels, memory, roofline, double quantization.

    python examples/experiments/figures.py        # about 10 s on 2 CPU cores

* nf4_levels.png: the 16 NF4 levels (`quant.nf4_code`) on the N(0, 1) density (QLoRA sec. 3);
* memory.png: training memory of Llama-3.2-1B, Llama-3-8B, Llama-3-70B, full vs LoRA vs
  QLoRA, from `lora.memory.estimate` (chapter 1);
* roofline.png: the analytic roofline of a GEMV/GEMM on an H200 (4.3 TB/s copy, 790 TFLOP/s
  bf16 matmul, measured on the H200 lent to this project in 2026-11) for bf16 weights,
  fused NF4 and dequantize-then-matmul; the points measured by `benchmarks/kernel_speed.py` are
  drawn on top when benchmarks/results/kernels.csv exists (`make gpu-check` on a GPU).
Writes the PNGs and figures.csv (the numbers behind them) to docs/figures/.
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import norm  # noqa: E402
from tour_setup import FIGURES, ROOT, save_figure  # noqa: E402

from benchmarks.common import make_row, read_rows, write_rows  # noqa: E402
from lora.memory import PRESETS, estimate, nf4_storage_bytes  # noqa: E402
from quant import nf4_code  # noqa: E402

HBM_BYTES_PER_S = 4.3e12  # H200 device copy, measured on the project's lent H200 (2026-11)
BF16_FLOPS = 790e12  # H200 bf16 matmul, measured there too
MODELS = ("llama-3.2-1b", "llama-3-8b", "llama-3-70b")
MEMORY_SETTINGS = dict(r=16, batch_size=4, seq_len=512, grad_checkpointing=True,
                       weight_dtype="bf16", act_dtype="bf16")  # `python -m lora.memory` and the README's table


def nf4_figure(rows: list) -> None:
    code = nf4_code().double().numpy()
    scale = norm.ppf(0.9677083)  # NF4's outer level sits at this N(0,1) quantile (QLoRA sec. 3)
    x = np.linspace(-3.2, 3.2, 400)
    fig, ax = plt.subplots(figsize=(7.5, 3))
    ax.plot(x, norm.pdf(x), "k", lw=1, label="N(0, 1) density")
    levels = code * scale
    ax.vlines(levels, 0, norm.pdf(levels), colors="tab:blue", lw=1.5, label="NF4 levels x 1/Φ⁻¹(0.9677)")
    ax.plot(levels, norm.pdf(levels), "o", color="tab:blue", ms=4)
    ax.vlines(np.linspace(-1, 1, 16) * scale, 0, 0.02, colors="tab:red", lw=1.5, label="INT4-like uniform levels")
    ax.set_xlabel("weight / (block absmax) x 1.848")
    ax.set_yticks([])
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("the 16 NF4 levels are quantiles of the normal distribution")
    save_figure(fig, FIGURES / "nf4_levels.png")
    plt.close(fig)
    for i, v in enumerate(code):
        rows.append(make_row("tour_figures", "nf4_code", f"index={i}", "level", float(v), "fraction"))


def memory_figure(rows: list) -> None:
    parts = ("weights", "gradients", "optimizer states", "activations")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
    for ax, name in zip(axes, MODELS, strict=True):
        totals = {}
        for k, method in enumerate(("full", "lora", "qlora")):
            est = dict(estimate(PRESETS[name], method=method, **MEMORY_SETTINGS).rows())
            bottom = 0.0
            for part, color in zip(parts, ("tab:blue", "tab:orange", "tab:red", "tab:green"), strict=True):
                gib = est[part] / 2**30
                ax.bar(k, gib, bottom=bottom, color=color, label=part if k == 0 else None)
                bottom += gib
                rows.append(make_row("tour_figures", method, name, f"memory_{part.replace(' ', '_')}", est[part], "bytes"))
            totals[method] = est["total"] / 2**30
            ax.text(k, bottom, f"{bottom:.1f}", ha="center", va="bottom", fontsize=8)
        print(f"{PRESETS[name].name}: total " + ", ".join(f"{m} {v:.2f} GiB" for m, v in totals.items()))
        ax.set_xticks(range(3), ["full", "LoRA", "QLoRA"])
        ax.set_title(PRESETS[name].name, fontsize=10)
        ax.set_ylabel("GiB")
    axes[0].legend(fontsize=7)
    fig.suptitle("training memory, bf16 weights, AdamW, r = 16 on all linear layers, 4 x 512 tokens, "
                 "gradient checkpointing", fontsize=9)
    fig.tight_layout()
    save_figure(fig, FIGURES / "memory.png")
    plt.close(fig)


def bytes_per_weight() -> dict[str, float]:
    """Bytes read (and written) per weight of one matmul, at blocksize 64 + double quantization."""
    nf4 = nf4_storage_bytes(64 * 1024 * 1024) / (64 * 1024 * 1024)  # 4.127 bits / 8 (QLoRA sec. 3)
    return {"bf16 weights": 2.0, "fused NF4": nf4, "dequantize then bf16 matmul": nf4 + 2.0 + 2.0}


def roofline_figure(rows: list) -> None:
    n, k = 4096, 4096
    bpw = bytes_per_weight()
    ms = np.array([1, 4, 16, 64, 256, 1024, 4096, 16384])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ai = np.logspace(-0.5, 4, 200)
    ax.plot(ai, np.minimum(BF16_FLOPS, HBM_BYTES_PER_S * ai) / 1e12, "k", lw=1, label="roofline (H200)")
    for (label, b), mk in zip(bpw.items(), ("o", "s", "^"), strict=True):
        flops = 2.0 * ms * n * k
        moved = b * n * k + 2.0 * ms * (n + k)  # weights + bf16 activations in and out
        intensity = flops / moved
        perf = np.minimum(BF16_FLOPS, HBM_BYTES_PER_S * intensity)
        times = flops / perf
        if label.startswith("dequantize"):  # two kernels: their times add
            dense = 2.0 * n * k + 2.0 * ms * (n + k)  # the bf16 matmul's bytes
            times = (b - 2.0) * n * k / HBM_BYTES_PER_S + np.maximum(flops / BF16_FLOPS, dense / HBM_BYTES_PER_S)
            perf = flops / times
        ax.plot(intensity, perf / 1e12, mk, ms=5, label=f"{label} ({b:.3f} B/weight)")
        ax2.plot(ms, times * 1e6, mk + "-", ms=4, label=label)
        for m, t in zip(ms, times, strict=True):
            rows.append(make_row("tour_figures", label, f"M{m}x{n}x{k}", "roofline_time", float(t * 1e6), "us"))
    measured = ROOT / "benchmarks" / "results" / "kernels.csv"
    if measured.is_file():
        for r in read_rows(measured):
            if r["metric"] == "gemv_time" and r["provider"] in ("loralab-triton", "torch-bf16", "dequant+matmul"):
                m, nn, kk = (int(v) for v in r["shape"][1:].split("x"))
                if (nn, kk) == (n, k):
                    ax2.plot(m, float(r["value"]) * 1e3, "kx", ms=7)
        ax2.plot([], [], "kx", label="measured GEMV (benchmarks/results/kernels.csv)")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("M (rows of input: tokens in flight)")
    ax2.set_ylabel("roofline time (us)")
    ax2.set_title("time bound of one layer", fontsize=10)
    ax2.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel("attainable TFLOP/s")
    ax.set_title(f"{n}x{k} layer, M = 1 ... 16384 rows of input", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, FIGURES / "roofline.png")
    plt.close(fig)
    for label, b in bpw.items():
        rows.append(make_row("tour_figures", label, "per weight", "bytes_moved", b, "bytes"))
    print("bytes per weight: " + ", ".join(f"{k} {v:.4f}" for k, v in bpw.items()))
    print(f"GEMV (M=1) time ratio bf16 / fused NF4 = {bpw['bf16 weights'] / bpw['fused NF4']:.2f}, "
          f"bf16 / dequantize-then-matmul = {bpw['bf16 weights'] / bpw['dequantize then bf16 matmul']:.2f}")


def main() -> int:
    rows: list = []
    nf4_figure(rows)
    memory_figure(rows)
    roofline_figure(rows)
    write_rows(FIGURES / "figures.csv", rows)
    print("wrote docs/figures/nf4_levels.png, memory.png, roofline.png, figures.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
