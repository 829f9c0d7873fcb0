"""NF4 quantize / dequantize throughput on the CPU: loralab vs bitsandbytes vs torchao, same run.

Every provider quantizes the same bfloat16 weight with blocksize 64 and double
quantization (QLoRA's setting; torchao always double-quantizes its scales) and
dequantizes back to bfloat16. Providers are timed round-robin (median of `--repeat`
rounds) because this machine is shared. GB/s counts the bfloat16 weight (2 bytes per
parameter) read by quantize or written by dequantize. Writes
benchmarks/results/quant_speed.csv and quant_speed.png and prints the ratios.

    python benchmarks/quant_speed.py                    # 4096x4096 and 4096x14336, 2 threads
    python benchmarks/quant_speed.py --shapes 1024x1024 --repeat 3
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS_DIR, make_row, time_cpu, write_rows  # noqa: E402
from quant import dequantize_4bit, quantize_4bit  # noqa: E402

BLOCKSIZE = 64  # QLoRA sec. 3


def providers() -> dict[str, tuple[Callable, Callable]]:
    """name -> (quantize(w) -> q, dequantize(q) -> bf16 tensor)."""
    out = {"loralab": (lambda w: quantize_4bit(w, "nf4", BLOCKSIZE, double_quant=True),
                       lambda q: dequantize_4bit(*q, dtype=torch.bfloat16))}
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as bnbf
        out["bitsandbytes"] = (
            lambda w: bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"),
            lambda q: bnbf.dequantize_4bit(*q))
    except ImportError:
        print("bitsandbytes not installed: skipped")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        out["torchao"] = (lambda w: to_nf4(w, block_size=BLOCKSIZE, scaler_block_size=256),
                          lambda q: q.get_original_weight())
    except ImportError:
        print("torchao not installed: skipped")
    return out


def measure(shape: tuple[int, int], repeat: int) -> dict[tuple[str, str], float]:
    """Median seconds of quantize and dequantize per provider, round-robin."""
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.bfloat16)
    provs = providers()
    quantized = {name: quant(w) for name, (quant, _) in provs.items()}  # warm-up and inputs
    for name, (_, dequant) in provs.items():
        out = dequant(quantized[name])
        err = ((out.float() - w.float()).norm() / w.float().norm()).item()
        assert out.shape == w.shape and err < 0.11, (name, err)  # every provider really round-trips
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeat):
        for name, (quant, dequant) in provs.items():
            q = quantized[name]
            t_quant = time_cpu(lambda quant=quant: quant(w), warmup=0, repeat=1)
            t_dequant = time_cpu(lambda dequant=dequant, q=q: dequant(q), warmup=0, repeat=1)
            samples.setdefault((name, "quantize"), []).append(t_quant)
            samples.setdefault((name, "dequantize"), []).append(t_dequant)
    return {k: statistics.median(v) for k, v in samples.items()}


def plot(times: dict, shapes: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted({n for _, n, _ in times})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, op in zip(axes, ("quantize", "dequantize"), strict=True):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ys = [times.get((s, name, op), float("nan")) * 1e3 for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
        ax.set(title=f"NF4 {op} (bf16, blocksize 64, double quant)", ylabel="ms (median, lower is better)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336"])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, times = [], {}
    for s in tqdm(args.shapes, desc="shapes"):
        shape = tuple(int(v) for v in s.split("x"))
        nbytes = 2 * shape[0] * shape[1]  # the bf16 weight
        for (name, op), sec in measure(shape, args.repeat).items():
            times[(s, name, op)] = sec
            rows.append(make_row("quant_speed", name, s, f"{op}_time", sec * 1e3, "ms"))
            rows.append(make_row("quant_speed", name, s, f"{op}_throughput", nbytes / sec / 1e9, "GB/s"))
    for (s, name, op), sec in list(times.items()):
        if name != "loralab":
            continue
        for peer in ("bitsandbytes", "torchao"):
            if (s, peer, op) in times:
                rows.append(make_row("quant_speed", "loralab", s, f"{op}_speedup_vs_{peer}",
                                     times[(s, peer, op)] / sec, "x"))
    csv_path = write_rows(args.out / "quant_speed.csv", rows)
    plot(times, args.shapes, args.out / "quant_speed.png")
    print(f"threads={args.threads}; speed-up = peer time / loralab time (>1: loralab faster)")
    print(f"{'shape':<12} {'op':<11} {'loralab ms':>10} {'GB/s':>6} {'vs bnb':>7} {'vs torchao':>10}")
    for s in args.shapes:
        for op in ("quantize", "dequantize"):
            t = times[(s, "loralab", op)]
            nbytes = 2 * int(s.split("x")[0]) * int(s.split("x")[1])
            ratio = {peer: times[(s, peer, op)] / t if (s, peer, op) in times else float("nan")
                     for peer in ("bitsandbytes", "torchao")}
            print(f"{s:<12} {op:<11} {t * 1e3:10.1f} {nbytes / t / 1e9:6.2f} {ratio['bitsandbytes']:7.2f}x "
                  f"{ratio['torchao']:9.2f}x")
    print(f"wrote {csv_path} and {args.out / 'quant_speed.png'}")


if __name__ == "__main__":
    main()
