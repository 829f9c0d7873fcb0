"""NF4 quantize / dequantize throughput on the CPU: loralab vs bitsandbytes vs torchao, same run.

Every provider quantizes the same bfloat16 weight with blocksize 64 and double
quantization (QLoRA's setting; torchao always double-quantizes its scales) and
dequantizes it back to bfloat16:

- "dequantize": into a new tensor, what a layer's forward does. A new 32-117 MB tensor
  costs page faults that can take longer than the arithmetic; both libraries pay them,
  and whether glibc hands out fresh pages or reuses freed ones depends on what ran before.
- "dequantize_recycled": the same calls after telling glibc to keep freed memory
  (`mallopt`, the state a caching allocator gives), every provider alike: the kernels' speed.
- "dequantize_into": into a buffer allocated once (loralab's `out=`; bitsandbytes' `out=`
  has no CPU kernel and torchao has none).

"loralab" is the default path (the C loop of quant/native.py where it builds),
"loralab-torch" the PyTorch-only path (`quant.force_backend("torch")`). Each op is timed round-robin over
the providers in a shuffled order (median of `--repeat` rounds) because this machine is
shared. GB/s counts the bfloat16 weight (2 bytes per parameter) read by quantize or
written by dequantize. Writes benchmarks/results/quant_speed.csv and quant_speed.png and
prints the ratios.

    python benchmarks/quant_speed.py                    # 4096x4096 and 4096x14336, 2 threads
    python benchmarks/quant_speed.py --shapes 1024x1024 --repeat 3
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import random
import statistics
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS_DIR, make_row, time_cpu, write_rows  # noqa: E402
from quant import dequantize_4bit, force_backend, native, quantize_4bit  # noqa: E402

BLOCKSIZE = 64  # QLoRA sec. 3
OPS = ("quantize", "dequantize", "dequantize_recycled", "dequantize_into")
PEERS = ("bitsandbytes", "torchao")


def providers() -> dict[str, tuple[Callable, Callable, Callable | None]]:
    """name -> (quantize(w) -> q, dequantize(q) -> new bf16 tensor, dequantize_into(q, out) or None)."""
    def quant(w):
        return quantize_4bit(w, "nf4", BLOCKSIZE, double_quant=True)

    def torch_only(fn):
        def call(*args):
            with force_backend("torch"):
                return fn(*args)
        return call

    out = {"loralab": (quant, lambda q: dequantize_4bit(*q, dtype=torch.bfloat16),
                       lambda q, o: dequantize_4bit(*q, out=o)),
           "loralab-torch": (quant, torch_only(lambda q: dequantize_4bit(*q, dtype=torch.bfloat16)),
                             torch_only(lambda q, o: dequantize_4bit(*q, out=o)))}
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as bnbf
        out["bitsandbytes"] = (
            lambda w: bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"),
            lambda q: bnbf.dequantize_4bit(*q),
            None)  # its out= has no CPU kernel (bitsandbytes 0.50: NotImplementedError)
    except ImportError:
        print("bitsandbytes not installed: skipped")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        out["torchao"] = (lambda w: to_nf4(w, block_size=BLOCKSIZE, scaler_block_size=256),
                          lambda q: q.get_original_weight(), None)
    except ImportError:
        print("torchao not installed: skipped")
    return out


def keep_freed_memory() -> bool:
    """Tell glibc to serve large allocations from the heap and keep freed memory (no munmap),
    so a new output reuses the pages of the last one instead of faulting in fresh ones.
    Process-wide and not undone: call it after the default-allocator measurements."""
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def measure(shape: tuple[int, int], ops: tuple[str, ...], repeat: int,
            warmup: int) -> dict[tuple[str, str], float]:
    """Median seconds of each op per provider, round-robin, after `warmup` untimed rounds."""
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.bfloat16)
    provs = providers()
    quantized = {name: quant(w) for name, (quant, _, _) in provs.items()}  # warm-up and inputs
    buffers = {name: torch.empty_like(w) for name, (_, _, into) in provs.items() if into}
    for name, (_, dequant, into) in provs.items():
        results = [dequant(quantized[name])] + ([into(quantized[name], buffers[name])] if into else [])
        for out in results:  # every provider really round-trips, both ways
            err = ((out.float() - w.float()).norm() / w.float().norm()).item()
            assert out.shape == w.shape and err < 0.11, (name, err)
    samples: dict[tuple[str, str], list[float]] = {}
    order = random.Random(0)
    for op in ops:  # one op at a time: each call follows the same op of another provider,
        for round_ in range(warmup + repeat):  # so the allocator is in a like state for all
            names = list(provs)
            order.shuffle(names)
            for name in names:
                quant, dequant, into = provs[name]
                if op == "quantize":
                    fn = functools.partial(quant, w)
                elif op == "dequantize_into":
                    if into is None:
                        continue
                    fn = functools.partial(into, quantized[name], buffers[name])
                else:  # dequantize, dequantize_recycled: the same call, another allocator state
                    fn = functools.partial(dequant, quantized[name])
                sec = time_cpu(fn, warmup=0, repeat=1)
                if round_ >= warmup:
                    samples.setdefault((name, op), []).append(sec)
    return {k: statistics.median(v) for k, v in samples.items()}


def plot(times: dict, shapes: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted({n for _, n, _ in times})
    titles = {"quantize": "quantize", "dequantize": "dequantize (new tensor)",
              "dequantize_recycled": "dequantize (new tensor, freed\nmemory reused)",
              "dequantize_into": "dequantize (into a buffer)"}
    ops = [op for op in OPS if any(k[2] == op for k in times)]
    fig, axes = plt.subplots(1, len(ops), figsize=(4.5 * len(ops), 3.8))
    for ax, op in zip(axes, ops, strict=True):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ys = [times.get((s, name, op), float("nan")) * 1e3 for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
        ax.set(title=f"NF4 {titles[op]}", ylabel="ms (median, log scale, lower is better)", yscale="log")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("bf16 weight, blocksize 64, double quantization; CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336"])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed rounds first: on a virtual machine the first touches of fresh "
                        "memory are slow for every provider")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, times = [], {}
    phases = [("quantize", "dequantize", "dequantize_into"), ("dequantize_recycled",)]
    for phase in phases:
        if phase == phases[1] and not keep_freed_memory():
            print("mallopt unavailable (not glibc): dequantize_recycled skipped")
            break
        for s in tqdm(args.shapes, desc=", ".join(phase)):
            shape = tuple(int(v) for v in s.split("x"))
            nbytes = 2 * shape[0] * shape[1]  # the bf16 weight
            for (name, op), sec in measure(shape, phase, args.repeat, args.warmup).items():
                times[(s, name, op)] = sec
                rows.append(make_row("quant_speed", name, s, f"{op}_time", sec * 1e3, "ms"))
                rows.append(make_row("quant_speed", name, s, f"{op}_throughput", nbytes / sec / 1e9, "GB/s"))
    for (s, name, op), sec in list(times.items()):
        if name != "loralab":
            continue
        for peer in PEERS:
            if (s, peer, op) in times:
                rows.append(make_row("quant_speed", "loralab", s, f"{op}_speedup_vs_{peer}",
                                     times[(s, peer, op)] / sec, "x"))
    csv_path = write_rows(args.out / "quant_speed.csv", rows)
    plot(times, args.shapes, args.out / "quant_speed.png")
    print(f"threads={args.threads}; loralab dequantize: {native.reason()}; "
          "speed-up = peer time / loralab time (>1: loralab faster)")
    print(f"{'shape':<12} {'op':<20} {'loralab ms':>10} {'GB/s':>6} {'torch path':>10} {'vs bnb':>7} {'vs torchao':>10}")
    for s in args.shapes:
        nbytes = 2 * int(s.split("x")[0]) * int(s.split("x")[1])
        for op in OPS:
            if (s, "loralab", op) not in times:
                continue
            t = times[(s, "loralab", op)]
            ratio = {peer: times[(s, peer, op)] / t if (s, peer, op) in times else float("nan")
                     for peer in PEERS}
            print(f"{s:<12} {op:<20} {t * 1e3:10.1f} {nbytes / t / 1e9:6.2f} "
                  f"{times[(s, 'loralab-torch', op)] * 1e3:8.1f}ms {ratio['bitsandbytes']:7.2f}x "
                  f"{ratio['torchao']:9.2f}x")
    print(f"wrote {csv_path} and {args.out / 'quant_speed.png'}")


if __name__ == "__main__":
    main()
