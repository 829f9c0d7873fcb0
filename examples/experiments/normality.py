"""Are SmolLM2's weight blocks normal, and what does that mean for NF4? (QLoRA sec. 3)

    python examples/experiments/normality.py        # about 1 min on 2 CPU cores

NF4 is optimal (each of its 16 levels equally used) when the weights of a block are
drawn from a zero-mean normal distribution (QLoRA sec. 3, "pretrained neural network
weights usually have a zero-centered normal distribution"). This script tests that
claim block by block, with the blocks NF4 actually uses (64 consecutive weights):

* Shapiro-Wilk at the 5% level on random blocks of each linear-layer type of SmolLM2-135M;
* two controls: true N(0, 1) blocks (a correct test rejects about 5%), and N(0, 1) blocks
  passed through GGUF Q4_1, because the only SmolLM2 weights this project can install
  are stored as Q4_1 (16 levels per 32 weights), and that rounding alone may fail a test;
* per-block NF4 and INT4 error for the blocks consistent with a normal distribution
  and for the rejected ones.

Writes docs/figures/normality.csv and normality.png.
"""
from __future__ import annotations

import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import kurtosis, shapiro  # noqa: E402
from tour_setup import FIGURES, save_figure, setup_threads  # noqa: E402

from benchmarks.common import make_row, write_rows  # noqa: E402
from benchmarks.quant_error import ALPHA, BLOCKSIZE, LINEARS, load_smollm2_linears, random_blocks  # noqa: E402
from quant import dequantize_4bit, quantize_4bit  # noqa: E402

BLOCKS_PER_GROUP = 20_000  # random blocks tested per layer type and per control
SEED = 0


def block_errors(blocks: np.ndarray, quant_type: str) -> np.ndarray:
    """Relative error ||x - q(x)|| / ||x|| of each block (one NF4/INT4 block per row)."""
    x = torch.from_numpy(blocks).float()  # (N, 64): each row is one quantization block
    packed, state = quantize_4bit(x, quant_type, BLOCKSIZE, double_quant=False)
    err = dequantize_4bit(packed, state, dtype=torch.float32) - x
    return (err.norm(dim=1) / x.norm(dim=1).clamp(min=1e-30)).double().numpy()


def q4_1(blocks: np.ndarray) -> np.ndarray:
    """Round trip through GGUF's Q4_1 (scale and minimum per 32 weights, 16 levels)."""
    import gguf
    from gguf import quants

    t = gguf.GGMLQuantizationType.Q4_1
    return np.asarray(quants.dequantize(quants.quantize(blocks.astype(np.float32), t), t), dtype=np.float64)


def main() -> int:
    setup_threads()
    t0 = time.perf_counter()
    import gguf  # noqa: F401  (fail early with the import error if the reader is missing)

    weights, _ = load_smollm2_linears()  # 210 tensors, 7 per block, in GGUF order
    groups: dict[str, np.ndarray] = {}
    for k, name in enumerate(LINEARS):
        groups[name] = random_blocks([w for i, w in enumerate(weights) if i % 7 == k], BLOCKS_PER_GROUP, SEED)
    gauss = torch.randn(BLOCKS_PER_GROUP, BLOCKSIZE, generator=torch.Generator().manual_seed(SEED),
                        dtype=torch.float64).numpy()  # (N, 64)
    groups["N(0,1)"] = gauss
    groups["N(0,1) via Q4_1"] = q4_1(gauss)
    rows, shares, errs = [], {}, {}
    for name, blocks in groups.items():
        p = shapiro(blocks, axis=1).pvalue
        normal = p >= ALPHA
        shares[name] = float(normal.mean())
        rows.append(make_row("normality", name, f"{len(blocks)}x{BLOCKSIZE}", "share_normal_at_0.05",
                             shares[name], "fraction"))
        for qt in ("nf4", "int4"):
            e = block_errors(blocks, qt)
            for label, mask in (("normal", normal), ("rejected", ~normal)):
                val = float(e[mask].mean()) if mask.any() else float("nan")
                errs[(name, qt, label)] = val
                rows.append(make_row("normality", name, f"{qt},{label} blocks", "mean_block_rel_error", val, "ratio"))
        print(f"{name:16s} normal at 5%: {100 * shares[name]:5.1f}%   NF4 error normal/rejected "
              f"{errs[(name, 'nf4', 'normal')]:.4f}/{errs[(name, 'nf4', 'rejected')]:.4f}   INT4 "
              f"{errs[(name, 'int4', 'normal')]:.4f}/{errs[(name, 'int4', 'rejected')]:.4f}")
    real = np.concatenate([groups[n] for n in LINEARS])
    p_all = shapiro(real, axis=1).pvalue
    rows.append(make_row("normality", "all SmolLM2 linears", f"{len(real)}x{BLOCKSIZE}", "share_normal_at_0.05",
                         float((p_all >= ALPHA).mean()), "fraction"))
    print(f"all 7 layer types together: {100 * (p_all >= ALPHA).mean():.1f}% of blocks normal at 5%")
    # Which way do rejected blocks deviate? Excess kurtosis > 0: heavier tails than a normal.
    heavy = kurtosis(real, axis=1) > 0
    for label, mask in (("rejected", p_all < ALPHA), ("normal", p_all >= ALPHA)):
        share = float(heavy[mask].mean())
        rows.append(make_row("normality", "all SmolLM2 linears", f"{label} blocks", "share_heavy_tailed",
                             share, "fraction"))
        print(f"  {label:8s} blocks with excess kurtosis > 0 (heavier tails than normal): {100 * share:.1f}%")
    rows.append(make_row("normality", "all", "-", "total_seconds", time.perf_counter() - t0, "s"))
    write_rows(FIGURES / "normality.csv", rows)
    plot(shares, errs, FIGURES / "normality.png")
    print(f"total {time.perf_counter() - t0:.0f} s; wrote docs/figures/normality.csv and normality.png")
    return 0


def plot(shares: dict, errs: dict, path) -> None:
    names = list(shares)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    colors = ["tab:blue"] * len(LINEARS) + ["tab:gray", "tab:olive"]
    ax1.bar(range(len(names)), [100 * shares[n] for n in names], color=colors)
    ax1.axhline(100 * (1 - ALPHA), color="k", ls="--", lw=1, label="expected for normal data (95%)")
    ax1.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax1.set_ylabel("blocks not rejected (%)")
    ax1.set_title(f"Shapiro-Wilk at 5%, blocks of {BLOCKSIZE}")
    ax1.legend(fontsize=8, loc="lower left")
    w = 0.2
    for k, (qt, label) in enumerate([("nf4", "normal"), ("nf4", "rejected"), ("int4", "normal"), ("int4", "rejected")]):
        ax2.bar(np.arange(len(names)) + (k - 1.5) * w, [errs[(n, qt, label)] for n in names], w,
                label=f"{qt.upper()}, {label} blocks")
    ax2.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax2.set_ylabel("mean relative error per block")
    ax2.set_title("4-bit error by block type")
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
