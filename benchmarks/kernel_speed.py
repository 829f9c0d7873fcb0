"""Triton NF4 kernels against bf16 `torch.matmul`, measured in the same run.

    PYTHONPATH=. python benchmarks/kernel_speed.py --out benchmarks/results      # on a CUDA GPU
    PYTHONPATH=. TRITON_INTERPRET=1 python benchmarks/kernel_speed.py --smoke     # code path on CPU (results/smoke)

Measures (CUDA events via `triton.testing.do_bench`; each call reads the next of several
copies of the weights, so that they do not sit in L2):
- dequantization bandwidth (GB/s) against a device-to-device copy;
- GEMV, M in {1, 4, 16}: speedup over bf16 matmul and over dequantize-then-matmul;
- GEMM, M in {512, 2048, 8192}: ratio to bf16 matmul;
- a QLoRA layer (r = 16) forward + backward at M = 4096 against dequantize-then-matmul.
Writes `kernels.csv` (tidy rows, see benchmarks/common.py) and `kernels.png` to `--out`.
A failing measurement is reported and skipped; the script only needs torch, triton,
matplotlib and tqdm (no install of this project: run it with PYTHONPATH=.).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, make_row, time_cpu, write_rows  # noqa: E402
from quant.atomic_file import atomic_write  # noqa: E402

# (N, K) of Llama-3-8B/70B layers; the headline shape of the GEMV goal first, so that it is
# measured even when the time budget runs out.
WEIGHTS = [(28672, 8192), (4096, 4096), (14336, 4096), (4096, 14336)]
SMOKE_WEIGHTS = [(64, 128), (96, 256)]
GOALS = {"dequant_copy_fraction": 0.85, "gemv_m1_speedup": 3.0, "gemm_m8192_ratio": 0.85,
         "qlora_speedup": 1.3}


@dataclass
class BenchConfig:
    """What to measure; `smoke` shrinks everything to run under the CPU interpreter."""

    out: Path = RESULTS_DIR  # folder for kernels.csv / kernels.png
    smoke: bool = False  # tiny shapes, CPU timing: checks the code path, not the speed
    weights: list = field(default_factory=lambda: list(WEIGHTS))  # (N, K) of each weight
    gemv_m: tuple = (1, 4, 16)  # decoding batch sizes
    gemm_m: tuple = (512, 2048, 8192)  # training batch sizes (tokens)
    qlora_m: int = 4096  # tokens in the QLoRA layer step
    rank: int = 16  # LoRA rank of that layer
    budget_s: float = 330.0  # stop starting new measurements after this long (gpu-check: < 8 min)
    l2_bytes: int = 60 << 20  # rotate through enough weight copies to exceed this


class Bench:
    """Collects rows and errors; times a function on the chosen device."""

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.device = "cpu" if cfg.smoke else "cuda"
        self.rows: list[dict] = []
        self.errors: list[str] = []
        self.t0 = time.time()

    def time_ms(self, fn, grad_to_none=None) -> float:
        if self.cfg.smoke:
            return 1e3 * time_cpu(fn, warmup=1, repeat=1)
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=60, grad_to_none=grad_to_none)

    def add(self, provider: str, shape: str, metric: str, value: float, unit: str) -> None:
        self.rows.append(make_row("kernels", provider, shape, metric, float(value), unit, self.device))

    def run(self, label: str, fn) -> None:
        """Run one measurement; a failure is recorded and printed, never fatal."""
        if time.time() - self.t0 > self.cfg.budget_s:
            self.errors.append(f"{label}: skipped (time budget of {self.cfg.budget_s:.0f} s spent)")
            return
        try:
            fn()
        except Exception as exc:  # report and go on with the next measurement
            self.errors.append(f"{label}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        finally:
            if self.device == "cuda":
                torch.cuda.empty_cache()


def rotation(nbytes: int, cfg: BenchConfig) -> int:
    """Copies of a buffer of `nbytes` needed so that cycling through them misses L2."""
    return 1 if cfg.smoke else max(1, min(16, math.ceil(3 * cfg.l2_bytes / max(nbytes, 1))))


def cycler(items):
    """A function returning the next item of `items` on each call."""
    it = itertools.cycle(items)
    return lambda: next(it)


def quantized_copies(n: int, k: int, copies: int, device: str):
    """`copies` NF4 weights (N, K), blocksize 64, double quantization (QLoRA's defaults)."""
    from quant import quantize_4bit

    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, k, device=device, generator=g, dtype=torch.float32) * 0.02
    packed, state = quantize_4bit(w.to(torch.bfloat16), "nf4", 64, True)
    return [(packed.clone(), state) for _ in range(copies)], w.to(torch.bfloat16)


def bench_copy(b: Bench) -> float:
    nbytes = (1 << 20) if b.cfg.smoke else (1 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=b.device)
    dst = torch.empty_like(src)
    ms = b.time_ms(lambda: dst.copy_(src))
    gbs = 2 * nbytes / ms / 1e6  # read + write
    b.add("torch-copy", f"{nbytes >> 20}MiB", "bandwidth", gbs, "GB/s")
    print(f"device copy: {gbs:.0f} GB/s")
    return gbs


def bench_dequant(b: Bench, n: int, k: int, weights, copy_gbs: float) -> None:
    from loralab_kernels import dequantize_4bit as triton_dequantize

    nxt = cycler(weights)
    ms = b.time_ms(lambda: triton_dequantize(*nxt(), torch.bfloat16))
    p, s = weights[0]
    moved = p.numel() + s.absmax.numel() + s.nested_absmax.numel() * 4 + n * k * 2
    gbs = moved / ms / 1e6
    shape = f"{n}x{k}"
    b.add("loralab-triton", shape, "dequant_time", ms, "ms")
    b.add("loralab-triton", shape, "dequant_bandwidth", gbs, "GB/s")
    b.add("loralab-triton", shape, "dequant_copy_fraction", gbs / copy_gbs, "x")
    print(f"dequant {shape}: {ms * 1e3:.1f} us, {gbs:.0f} GB/s = {gbs / copy_gbs:.2f} x copy")


def _matmul_peers(b: Bench, n: int, k: int, m: int, weights, w_bf16):
    """Timings (ms) of ours, bf16 matmul and dequantize-then-matmul at one M."""
    from loralab_kernels import dequantize_4bit as triton_dequantize
    from loralab_kernels import matmul_4bit

    x = torch.randn(m, k, device=b.device, dtype=torch.bfloat16)
    nxt = cycler(weights)
    ours = b.time_ms(lambda: matmul_4bit(x, *nxt()))
    dense = [w_bf16] + [w_bf16.clone() for _ in range(rotation(n * k * 2, b.cfg) - 1)]
    nxt_w = cycler(dense)
    bf16 = b.time_ms(lambda: torch.matmul(x, nxt_w().T))
    deq = b.time_ms(lambda: torch.matmul(x, triton_dequantize(*nxt(), torch.bfloat16).T))
    return ours, bf16, deq


def bench_gemv(b: Bench, n: int, k: int, weights, w_bf16) -> None:
    for m in b.cfg.gemv_m:
        def one(m=m):
            ours, bf16, deq = _matmul_peers(b, n, k, m, weights, w_bf16)
            shape = f"M{m}x{n}x{k}"
            for prov, ms in (("loralab-triton", ours), ("torch-bf16", bf16), ("dequant+matmul", deq)):
                b.add(prov, shape, "gemv_time", ms, "ms")
            b.add("loralab-triton", shape, "gemv_speedup_vs_bf16", bf16 / ours, "x")
            b.add("loralab-triton", shape, "gemv_speedup_vs_dequant_matmul", deq / ours, "x")
            gbs = (n * k // 2 + n * k // 64 * 1.06) / ours / 1e6
            b.add("loralab-triton", shape, "gemv_weight_bandwidth", gbs, "GB/s")
            print(f"gemv {shape}: ours {ours * 1e3:.1f} us ({gbs:.0f} GB/s), bf16 {bf16 * 1e3:.1f} us, "
                  f"dequant+matmul {deq * 1e3:.1f} us -> {bf16 / ours:.2f}x vs bf16, "
                  f"{deq / ours:.2f}x vs dequant+matmul")
        b.run(f"gemv M={m} {n}x{k}", one)


def bench_gemm(b: Bench, n: int, k: int, weights, w_bf16) -> None:
    for m in b.cfg.gemm_m:
        def one(m=m):
            ours, bf16, deq = _matmul_peers(b, n, k, m, weights, w_bf16)
            shape = f"M{m}x{n}x{k}"
            for prov, ms in (("loralab-triton", ours), ("torch-bf16", bf16), ("dequant+matmul", deq)):
                b.add(prov, shape, "gemm_time", ms, "ms")
                b.add(prov, shape, "gemm_tflops", 2 * m * n * k / ms / 1e9, "TFLOP/s")
            b.add("loralab-triton", shape, "gemm_ratio_vs_bf16", bf16 / ours, "x")
            print(f"gemm {shape}: ours {ours:.3f} ms ({2 * m * n * k / ours / 1e9:.0f} TFLOP/s), "
                  f"bf16 {bf16:.3f} ms, dequant+matmul {deq:.3f} ms -> {bf16 / ours:.2f}x of bf16")
        b.run(f"gemm M={m} {n}x{k}", one)


class DequantThenMatmul(torch.autograd.Function):
    """The peer: dequantize the whole weight in forward and again in backward (as
    bitsandbytes' MatMul4Bit does), then a bf16 matmul."""

    @staticmethod
    def forward(ctx, x, packed, state, dequant):
        ctx.args = (packed, state, dequant)
        return x @ dequant(packed, state, x.dtype).T

    @staticmethod
    def backward(ctx, gy):
        packed, state, dequant = ctx.args
        return gy @ dequant(packed, state, gy.dtype), None, None, None


def bench_qlora(b: Bench, n: int, k: int, weights) -> None:
    from loralab_kernels import dequantize_4bit as triton_dequantize
    from loralab_kernels import linear_4bit
    from quant import dequantize_4bit

    def one():
        m, r = b.cfg.qlora_m, b.cfg.rank
        x = torch.randn(m, k, device=b.device, dtype=torch.bfloat16, requires_grad=True)
        lora_A = (torch.randn(r, k, device=b.device) / k**0.5).to(torch.bfloat16).requires_grad_()
        lora_B = (torch.randn(n, r, device=b.device) * 0.01).to(torch.bfloat16).requires_grad_()
        gy = torch.randn(m, n, device=b.device, dtype=torch.bfloat16)
        scaling = 2.0  # alpha / r with alpha = 32, r = 16
        nxt = cycler(weights)

        def step(base):
            packed, state = nxt()
            y = base(x, packed, state) + (x @ lora_A.T) @ lora_B.T * scaling  # (M, N)
            y.backward(gy)

        peers = {
            "loralab-triton": lambda x, p, s: linear_4bit(x, p, s, backend="triton"),
            "dequant(triton)+matmul": lambda x, p, s: DequantThenMatmul.apply(x, p, s, triton_dequantize),
            "dequant(torch)+matmul": lambda x, p, s: DequantThenMatmul.apply(
                x, p, s, lambda p, s, dt: dequantize_4bit(p, s, dtype=dt)),
        }
        times = {name: b.time_ms(lambda f=f: step(f), grad_to_none=[x, lora_A, lora_B])
                 for name, f in peers.items()}
        shape = f"M{m}x{n}x{k}r{r}"
        for name, ms in times.items():
            b.add(name, shape, "qlora_fwd_bwd_time", ms, "ms")
        ours = times["loralab-triton"]
        for name in ("dequant(triton)+matmul", "dequant(torch)+matmul"):
            b.add("loralab-triton", shape, f"qlora_speedup_vs_{name}", times[name] / ours, "x")
        print(f"qlora fwd+bwd {shape}: " + ", ".join(f"{k_} {v:.3f} ms" for k_, v in times.items())
              + f" -> {times['dequant(triton)+matmul'] / ours:.2f}x vs dequant(triton)+matmul, "
              f"{times['dequant(torch)+matmul'] / ours:.2f}x vs dequant(torch)+matmul")
    b.run(f"qlora {n}x{k}", one)


def check_goals(rows: list[dict], cfg: BenchConfig) -> list[str]:
    """One line per goal of the issue: measured value, goal, PASS/FAIL."""
    def values(metric, shape_filter=lambda s: True):
        return [(r["shape"], float(r["value"])) for r in rows
                if r["metric"] == metric and shape_filter(r["shape"])]

    big_n, big_k = max(cfg.weights, key=lambda nk: nk[0] * nk[1])
    lines = []
    checks = [
        ("dequant >= 85% of copy", values("dequant_copy_fraction"), GOALS["dequant_copy_fraction"]),
        (f"GEMV M=1 {big_n}x{big_k} vs bf16", values("gemv_speedup_vs_bf16",
                                                   lambda s: s == f"M1x{big_n}x{big_k}"), GOALS["gemv_m1_speedup"]),
        (f"GEMM M={cfg.gemm_m[-1]} vs bf16", values("gemm_ratio_vs_bf16",
                                                  lambda s: s.startswith(f"M{cfg.gemm_m[-1]}x")), GOALS["gemm_m8192_ratio"]),
        ("QLoRA fwd+bwd vs dequant(triton)+matmul",
         values("qlora_speedup_vs_dequant(triton)+matmul"), GOALS["qlora_speedup"]),
        ("QLoRA fwd+bwd vs dequant(torch)+matmul",
         values("qlora_speedup_vs_dequant(torch)+matmul"), GOALS["qlora_speedup"]),
    ]
    for name, vals, goal in checks:
        if not vals:
            lines.append(f"GOAL {name}: not measured")
        for shape, v in vals:
            lines.append(f"GOAL {name} [{shape}]: {v:.2f} (goal {goal}) {'PASS' if v >= goal else 'FAIL'}")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Four panels drawn from the CSV rows; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("dequant_copy_fraction", "dequantize: fraction of copy bandwidth", GOALS["dequant_copy_fraction"]),
              ("gemv_speedup_vs_bf16", "GEMV: speedup over bf16 matmul", GOALS["gemv_m1_speedup"]),
              ("gemm_ratio_vs_bf16", "GEMM: speed relative to bf16 matmul", GOALS["gemm_m8192_ratio"]),
              ("qlora_speedup_vs_dequant(triton)+matmul", "QLoRA fwd+bwd: speedup over dequant+matmul",
               GOALS["qlora_speedup"])]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    for ax, (metric, title, goal) in zip(axes.flat, panels, strict=True):
        sel = [r for r in rows if r["metric"] == metric]
        bars = ax.bar(range(len(sel)), [float(r["value"]) for r in sel], color="tab:blue")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(sel)), [r["shape"] for r in sel], rotation=45, ha="right", fontsize=7)
        ax.axhline(goal, color="tab:red", linestyle="--", label=f"goal {goal}")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    dev = rows[0]["device"] if rows else "?"
    fig.suptitle(f"loralab NF4 Triton kernels on {dev}")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def bench_weight(b: Bench, n: int, k: int, copy_gbs: float) -> None:
    """Every measurement on one weight shape (N, K)."""
    made = {}
    b.run(f"quantize {n}x{k}", lambda: made.setdefault(
        "w", quantized_copies(n, k, rotation(n * k // 2, b.cfg), b.device)))
    if "w" not in made:
        return
    weights, w_bf16 = made["w"]
    b.run(f"dequant {n}x{k}", lambda: bench_dequant(b, n, k, weights, copy_gbs))
    bench_gemv(b, n, k, weights, w_bf16)
    bench_gemm(b, n, k, weights, w_bf16)
    bench_qlora(b, n, k, weights)


def run_all(cfg: BenchConfig) -> Bench:
    from tqdm import tqdm

    b = Bench(cfg)
    copy_gbs = []
    b.run("copy", lambda: copy_gbs.append(bench_copy(b)))
    for n, k in tqdm(cfg.weights, desc="weights", disable=None):
        bench_weight(b, n, k, copy_gbs[0] if copy_gbs else float("nan"))
    return b


def parse_args(argv=None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="folder for kernels.csv and kernels.png (default benchmarks/results, "
                        "or benchmarks/results/smoke with --smoke so GPU results are never overwritten)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting measurements after this")
    a = p.parse_args(argv)
    out = a.out if a.out is not None else (RESULTS_DIR / "smoke" if a.smoke else RESULTS_DIR)
    cfg = BenchConfig(out=out, smoke=a.smoke, budget_s=a.budget_s)
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        cfg.weights, cfg.gemv_m, cfg.gemm_m, cfg.qlora_m, cfg.rank = SMOKE_WEIGHTS, (1, 4), (32,), 32, 4
    elif not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke for the CPU code path")
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    t0 = time.time()
    b = run_all(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    csv_path = write_rows(cfg.out / "kernels.csv", b.rows)
    print(f"wrote {len(b.rows)} rows to {csv_path}")
    if b.rows:
        b.run("plot", lambda: plot(b.rows, cfg.out / "kernels.png"))
    from loralab_kernels.tuning import chosen_configs

    tuned = {" ".join(map(str, key)): vars(c) for key, c in chosen_configs().items()}
    write_text_atomic(cfg.out / "kernels_configs.json", json.dumps(tuned, indent=1))
    if cfg.smoke:
        print("smoke run: interpreter timings say nothing about speed; goals below are not meaningful")
    for line in check_goals(b.rows, cfg):
        print(line)
    for err in b.errors:
        print("ERROR", err)
    print(f"total {time.time() - t0:.0f} s, {len(b.errors)} failed or skipped measurements")
    return 0 if b.rows else 1


if __name__ == "__main__":
    sys.exit(main())
