"""How close does each adapter start get to W? LoftQ, QPiSSA and B = 0 on NF4/NF3/NF2 bases,
against PEFT's own LoftQ code, on SmolLM2-135M's real layers.

Metric: `||W - (dequant(Q) + B @ A)||_F / ||W||_F` (scaling 1), summed over the layers
(`sqrt(sum err^2 / sum ||W||^2)`), and the wall time of each initialization. Methods:

* zero:    Q = quant(W), B = 0 (QLoRA's start; independent of r)
* loftq_T: LoftQ (Li et al. 2023, Algorithm 1) after T = 1 and T = 5 alternating steps
* qpissa:  QPiSSA (Meng et al. 2024, sec. 4): top-r SVD of W, the residual quantized

Providers, compared like with like (blocksize 64, no double quantization, exact SVD, float32):

* loralab: `lora.init.loftq_iterates` / `qpissa` with NF4, NF3, NF2 (`quant.normal_float_code`:
  NF4's outer quantile 0.9677083 at every width, as PEFT and LoftQ's code; NF2 -1, 0, 0.338, 1).
* loralab-rev1 (NF3, NF2): the same B = 0 and LoftQ with revision 1 of the NF3/NF2 code books
  (`normal_float_code(k, offset=centered_offset(k))`: QLoRA's NF4 construction carried to k
  bits; NF2 -1, 0, 0.436, 1), quantized here the obvious way (blockwise absmax, nearest level)
  with the exact SVD: errors only, to compare the two code books (its times are not comparable).
* peft (NF4): PEFT 0.21's `loftq_init` hard-codes a CUDA/XPU device, so its loop is run
  here step for step on the CPU: bitsandbytes' `quantize_4bit(compress_statistics=False,
  quant_type="nf4", blocksize=64)` (what its `Params4bit(...).to(device)` calls) and
  `peft.utils.loftq_utils._low_rank_decomposition`. PEFT 0.21 has no NF3/NF2 path.
* peft-0.17 (NF2): PEFT up to 0.19 shipped its own `NFQuantizer` (removed in 0.20), used by
  `loftq_init(num_bits=2)`, which runs on the CPU as it is. Pass that release's
  `peft/utils/loftq_utils.py` with `--peft-old-loftq FILE` (`pip download peft==0.17.1
  --no-deps` and unzip it). Its NF2 levels are -1, 0, 0.338, 1, this project's NF2. It
  accepts 2, 4 and 8 bits only (its 3-bit packing fails): no NF3 peer exists.

    python benchmarks/init_error.py                    # 21 layers (blocks 0, 14, 29), ~5 min on 2 busy cores
    python benchmarks/init_error.py --quick            # 2 layers
    python benchmarks/init_error.py --peft-old-loftq unzipped-peft-0.17.1/peft/utils/loftq_utils.py

Writes benchmarks/results/init_error.csv and init_error.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS_DIR, make_row, write_rows  # noqa: E402
from lora.init import loftq_iterates, qpissa, top_r_svd  # noqa: E402
from quant import dequantize_4bit, normal_float_code, quantize_4bit  # noqa: E402
from quant.codes import centered_offset  # noqa: E402

BLOCKSIZE = 64  # QLoRA sec. 3; PEFT's Params4bit default
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
ITERS = (1, 5)
RANKS = (16, 64)
BITS = (4, 3, 2)
PROVIDERS = ("loralab", "loralab-rev1", "peft", "peft-0.17")


def load_layers(blocks: tuple[int, ...], linears: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """name -> float32 (out, in) weight of SmolLM2-135M-Instruct (GGUF, dequantized)."""
    import gguf

    from examples.gguf_loader import default_gguf_path

    reader = gguf.GGUFReader(str(default_gguf_path()))
    wanted = {f"blk.{b}.{name}.weight" for b in blocks for name in linears}
    out = {}
    for t in reader.tensors:
        if t.name in wanted:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
            out[t.name] = torch.tensor(arr, dtype=torch.float32).contiguous()
    return dict(sorted(out.items()))


def err2(W: torch.Tensor, deq: torch.Tensor, B: torch.Tensor | None = None, A: torch.Tensor | None = None) -> float:
    """Squared Frobenius error in float64."""
    approx = deq.double() if B is None else deq.double() + B.double() @ A.double()
    return float((W.double() - approx).pow(2).sum())


def ours(W: torch.Tensor, bits: int, r: int, rec) -> None:
    t0 = time.perf_counter()
    packed, state = quantize_4bit(W, f"nf{bits}", BLOCKSIZE, False)
    deq = dequantize_4bit(packed, state, dtype=torch.float32)
    rec("loralab", "zero", bits, r, err2(W, deq), time.perf_counter() - t0)
    steps = loftq_iterates(W, bits, r, max(ITERS), blocksize=BLOCKSIZE, double_quant=False)
    elapsed = 0.0
    for t in range(1, max(ITERS) + 1):
        t0 = time.perf_counter()
        (packed, state), A, B = next(steps)
        elapsed += time.perf_counter() - t0
        if t in ITERS:
            rec("loralab", f"loftq_{t}", bits, r, err2(W, dequantize_4bit(packed, state), B, A), elapsed)
    t0 = time.perf_counter()
    (packed, state), A, B = qpissa(W, bits, r, blocksize=BLOCKSIZE, double_quant=False)
    rec("loralab", "qpissa", bits, r, err2(W, dequantize_4bit(packed, state), B, A), time.perf_counter() - t0)


def quantize_levels(W: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Blockwise absmax quantization to the nearest of `levels`, dequantized: float32 (out, in)."""
    blocks = W.reshape(-1, BLOCKSIZE)  # (n / 64, 64); SmolLM2's rows are whole blocks
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    idx = ((blocks / absmax).unsqueeze(-1) - levels).abs().argmin(dim=-1)  # (n / 64, 64)
    return (levels[idx] * absmax).reshape(W.shape)


def rev1(W: torch.Tensor, bits: int, r: int, rec) -> None:
    """B = 0 and LoftQ with revision 1 of the NF3/NF2 code (see the module docstring)."""
    levels = normal_float_code(bits, offset=centered_offset(bits))
    t0 = time.perf_counter()
    rec("loralab-rev1", "zero", bits, r, err2(W, quantize_levels(W, levels)), time.perf_counter() - t0)
    res = W
    for t in range(1, max(ITERS) + 1):
        deq = quantize_levels(res, levels)
        U, S, Vh = top_r_svd(W - deq, r)
        B, A = U * S, Vh  # (out, r), (r, in): B A is the best rank-r fit of W - deq
        res = W - B @ A
        if t in ITERS:
            rec("loralab-rev1", f"loftq_{t}", bits, r, err2(W, deq, B, A), 0.0)


def peft_nf4(W: torch.Tensor, r: int, rec) -> None:
    """PEFT 0.21's `loftq_init(num_bits=4)` loop on the CPU (see the module docstring)."""
    import bitsandbytes.functional as F
    from peft.utils.loftq_utils import _low_rank_decomposition

    t0 = time.perf_counter()
    q, st = F.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=False, quant_type="nf4")
    rec("peft", "zero", 4, r, err2(W, F.dequantize_4bit(q, st)), time.perf_counter() - t0)
    res, elapsed = W.clone(), 0.0
    for t in range(1, max(ITERS) + 1):
        t0 = time.perf_counter()
        q, st = F.quantize_4bit(res, blocksize=BLOCKSIZE, compress_statistics=False, quant_type="nf4")
        deq = F.dequantize_4bit(q, st)
        out = _low_rank_decomposition(W - deq, reduced_rank=r)
        L, R = out["L"], out["R"]
        res = W - L @ R
        elapsed += time.perf_counter() - t0
        if t in ITERS:
            rec("peft", f"loftq_{t}", 4, r, err2(W, deq, L, R), elapsed)


def peft_old_nf2(module, W: torch.Tensor, r: int, rec) -> None:
    """PEFT 0.17's `loftq_init(W, num_bits=2)` as it is (its NFQuantizer runs on the CPU)."""
    q = module.NFQuantizer(num_bits=2, device="cpu", method="normal", block_size=BLOCKSIZE)
    t0 = time.perf_counter()
    deq = q.dequantize_block(*q.quantize_block(W))
    rec("peft-0.17", "zero", 2, r, err2(W, deq), time.perf_counter() - t0)
    for T in ITERS:
        t0 = time.perf_counter()
        deq, lora_A, lora_B = module.loftq_init(W, num_bits=2, reduced_rank=r, num_iter=T)
        rec("peft-0.17", f"loftq_{T}", 2, r, err2(W, deq, lora_B, lora_A), time.perf_counter() - t0)


def load_old_peft(path: str | None):
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("peft_old_loftq_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "NFQuantizer"):
        raise ValueError(f"--peft-old-loftq {path}: no NFQuantizer in it (PEFT <= 0.19's loftq_utils.py)")
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 layers instead of 21")
    p.add_argument("--peft-old-loftq", default=None, metavar="FILE",
                   help="PEFT <= 0.19's peft/utils/loftq_utils.py, for its NF2 LoftQ")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    old = load_old_peft(args.peft_old_loftq)
    blocks, linears = ((0,), ("attn_q", "ffn_down")) if args.quick else ((0, 14, 29), LINEARS)
    layers = load_layers(blocks, linears)
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])  # (provider, method, bits, r) -> [err2, s]
    norm2 = 0.0

    def rec(provider, method, bits, r, e2, seconds):
        sums[(provider, method, bits, r)][0] += e2
        sums[(provider, method, bits, r)][1] += seconds

    work = [(name, r) for name in layers for r in RANKS]
    for name, r in tqdm(work, desc="init error", unit="layer x r"):
        W = layers[name]
        if r == RANKS[0]:
            norm2 += float(W.double().pow(2).sum())
        for bits in BITS:
            ours(W, bits, r, rec)
            if bits < 4:
                rev1(W, bits, r, rec)
        peft_nf4(W, r, rec)
        if old is not None:
            peft_old_nf2(old, W, r, rec)
    shape = f"smollm2 {len(layers)} layers"
    rows = []
    for (provider, method, bits, r), (e2, seconds) in sorted(sums.items()):
        key = f"nf{bits} r={r} {method}"
        rows.append(make_row("init_error", provider, shape, f"{key} rel_error", math.sqrt(e2 / norm2), "ratio"))
        if provider != "loralab-rev1":  # errors only (see the module docstring)
            rows.append(make_row("init_error", provider, shape, f"{key} seconds", seconds, "s"))
    name = "init_error_quick" if args.quick else "init_error"
    path = write_rows(RESULTS_DIR / f"{name}.csv", rows)
    table(sums, norm2)
    plot(sums, norm2, RESULTS_DIR / f"{name}.png", shape)
    print(f"wrote {path}")
    return 0


def table(sums, norm2) -> None:
    print(f"{'bits':>4} {'r':>3} {'method':8} " + " ".join(f"{p:>22}" for p in PROVIDERS))
    keys = sorted({(b, r, m) for (_, m, b, r) in sums}, key=lambda k: (-k[0], k[1], k[2]))
    for bits, r, method in keys:
        cells = []
        for provider in PROVIDERS:
            v = sums.get((provider, method, bits, r))
            seconds = f"{v[1]:7.2f}s" if v and provider != "loralab-rev1" else " " * 8
            cells.append(f"{math.sqrt(v[0] / norm2):.5f} {seconds}".rjust(22) if v else " " * 22)
        print(f"{bits:>4} {r:>3} {method:8} " + " ".join(cells))


def plot(sums, norm2, path: Path, shape: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ("zero", "loftq_1", "loftq_5", "qpissa")
    fig, axes = plt.subplots(2, len(RANKS), figsize=(6 * len(RANKS), 7.5))
    colors = {"loralab": "tab:blue", "loralab-rev1": "tab:cyan", "peft": "tab:orange", "peft-0.17": "tab:red"}
    for col, r in enumerate(RANKS):
        for ax, metric in zip(axes[:, col], ("error", "seconds"), strict=True):
            bars = [(b, m, p) for b in BITS for m in methods for p in colors if (p, m, b, r) in sums
                    and not (metric == "seconds" and p == "loralab-rev1")]
            x = range(len(bars))
            vals = [math.sqrt(sums[(p, m, b, r)][0] / norm2) if metric == "error" else sums[(p, m, b, r)][1]
                    for b, m, p in bars]
            ax.bar(x, vals, color=[colors[p] for _, _, p in bars])
            ax.set_xticks(list(x), [f"NF{b} {m}" for b, m, _ in bars], rotation=70, fontsize=7)
            ax.set_ylabel("||W - (Q + BA)|| / ||W||" if metric == "error" else "wall time, all layers (s)")
            if metric == "seconds":
                ax.set_yscale("log")
            ax.set_title(f"r = {r}: {'reconstruction error' if metric == 'error' else 'init time'} ({shape})")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    axes[0, 0].legend(handles, ["loralab", "loralab, NF3/NF2 code rev. 1 (error only)",
                                "PEFT 0.21 loop (bnb NF4, CPU)", "PEFT 0.17 loftq_init (NF2)"],
                      fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
