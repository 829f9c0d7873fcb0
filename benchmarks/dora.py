"""DoRA's row norm and DoRA layer step on the CPU: loralab's factored norm vs forming W + s B A (PEFT).

DoRA needs `||W + s B A||` per output row at every forward (DoRA eq. 5). PEFT forms the
(out, in) matrix (after building `B A` through an identity matrix, `lora_B(lora_A(eye))`);
loralab expands the square, `||W||^2 + 2 s rowsum((W A^T) * B) + s^2 rowsum((B A A^T) * B)`,
with `||W||^2` cached (see `lora.dora`). Providers, each on the same (d, d) float32 weight:

- norm: `loralab_factored` (cached ||W||^2), `dense` (the obvious formula), `peft`
  (`DoraLinearLayer.get_lora_weight` + `get_weight_norm`).
- step: one forward + backward of a whole DoRA layer over `--tokens` tokens,
  `loralab` (`LoRALinear(dora=True)`) vs `peft` (`lora.Linear(use_dora=True)`).

Time: median of `--repeat` runs, providers in the same run. Peak memory: each provider
runs in its own subprocess, which resets the kernel's peak-RSS counter (`/proc/self/clear_refs`)
after setup and reads `VmHWM - VmRSS` after the measured call: the extra resident memory
the call needed (Linux only). The bytes of the (out, in) temporaries are also counted
analytically (`temp_bytes_analytic`). Writes benchmarks/results/dora.csv and dora.png.

    python benchmarks/dora.py                  # d = 4096, r in {16, 64}
    python benchmarks/dora.py --d 1024 --r 8   # quicker
    python benchmarks/dora.py --plot-only
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS_DIR, make_row, read_rows, time_cpu, write_rows  # noqa: E402

NORM_PROVIDERS = ("loralab_factored", "dense", "peft")
STEP_PROVIDERS = ("loralab", "peft")


def _setup(kind: str, provider: str, d: int, r: int, tokens: int):
    """Build the inputs and return a zero-argument function that runs the measured call once."""
    from lora import LoRALinear
    from lora.dora import dense_row_norm, factored_row_norm, weight_row_sq_norm

    torch.manual_seed(0)
    W = torch.empty(d, d).normal_(std=d ** -0.5)  # in place: no setup temporaries
    A = torch.empty(r, d).normal_(std=d ** -0.5)
    B = torch.empty(d, r).normal_(std=0.01)
    scaling = 2.0
    if kind == "norm":
        if provider == "loralab_factored":
            w_sq = weight_row_sq_norm(W)  # cached once per weight (W is frozen)
            return lambda: factored_row_norm(W, A, B, scaling, w_sq=w_sq)
        if provider == "dense":
            return lambda: dense_row_norm(W, A, B, scaling)
        from peft.tuners.lora.dora import DoraLinearLayer
        dora = DoraLinearLayer(fan_in_fan_out=False)
        lora_A, lora_B = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        lora_A.weight.data, lora_B.weight.data = A, B
        return lambda: dora.get_weight_norm(W, dora.get_lora_weight(lora_A, lora_B).detach(), scaling)
    base = nn.Linear(d, d)
    base.weight.data = W
    if provider == "loralab":
        layer = LoRALinear.from_layer(base, r=r, alpha=scaling * r, dora=True)
    else:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["x"], use_dora=True)
            layer = PeftLinear(base, "default", cfg, r=r, lora_alpha=scaling * r, use_dora=True)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(B)
    x = torch.randn(tokens, d, requires_grad=True)
    grad = torch.randn(tokens, d)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)
    return step


def _rss_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return (int(re.search(r"VmHWM:\s+(\d+)", status).group(1)), int(re.search(r"VmRSS:\s+(\d+)", status).group(1)))


def child(kind: str, provider: str, d: int, r: int, tokens: int, repeat: int, threads: int) -> dict:
    """Runs inside a subprocess: peak extra RSS of the second call (after a warm-up), then the median time."""
    torch.set_num_threads(threads)
    fn = _setup(kind, provider, d, r, tokens)
    with torch.no_grad() if kind == "norm" else torch.enable_grad():
        fn()  # warm-up: one-time allocations (thread pools, autograd engine) are not the call's cost
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter to the current RSS
        _, before = _rss_kib()
        fn()
        peak, _ = _rss_kib()
        seconds = time_cpu(fn, warmup=0, repeat=repeat)
    return {"peak_extra_mib": max(0, peak - before) / 1024, "seconds": seconds}


def temp_bytes(kind: str, provider: str, d: int, r: int) -> int:
    """Analytic bytes of the norm's temporaries, float32 (4 bytes): (d, d) matrices vs (d, r) ones."""
    full, thin = 4 * d * d, 4 * d * r
    if provider == "loralab_factored":
        return 2 * thin + 4 * r * r + 3 * 4 * d  # W A^T, B (A A^T), A A^T, three (d,) vectors
    if provider == "dense":
        return 3 * full  # B A, W + s B A (the scaled product too)
    return 4 * full  # eye(d), B A via the identity, its transpose-copy, W + s B A (PEFT)


def run(ds, ranks, tokens, repeat, threads) -> list[dict]:
    rows = []
    jobs = [(k, p, d, r) for d in ds for r in ranks
            for k, providers in (("norm", NORM_PROVIDERS), ("step", STEP_PROVIDERS)) for p in providers]
    results = {}
    for kind, provider, d, r in tqdm(jobs, desc="dora benchmark (one subprocess each)"):
        cmd = [sys.executable, __file__, "--child", json.dumps([kind, provider, d, r, tokens, repeat, threads])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results[kind, provider, d, r] = res
        shape = f"d={d},r={r}" + (f",tokens={tokens}" if kind == "step" else "")
        rows.append(make_row("dora", provider, shape, f"{kind}_time", res["seconds"] * 1e3, "ms"))
        rows.append(make_row("dora", provider, shape, f"{kind}_peak_extra_rss", res["peak_extra_mib"], "MiB"))
        if kind == "norm":
            rows.append(make_row("dora", provider, shape, "norm_temp_bytes_analytic",
                                 temp_bytes(kind, provider, d, r) / 2 ** 20, "MiB"))
    for d in ds:
        for r in ranks:
            for kind, ours, theirs in (("norm", "loralab_factored", "peft"), ("norm", "loralab_factored", "dense"),
                                       ("step", "loralab", "peft")):
                a, b = results[kind, ours, d, r], results[kind, theirs, d, r]
                shape = f"d={d},r={r}" + (f",tokens={tokens}" if kind == "step" else "")
                speedup = b["seconds"] / a["seconds"]
                # RSS grows in pages taken from the allocator's pool: a call needing well under 1 MiB can read
                # as 0, so the denominator is floored at the analytic temporaries (norm) or 1 MiB (step).
                floor = temp_bytes(kind, ours, d, r) / 2 ** 20 if kind == "norm" else 1.0
                mem = b["peak_extra_mib"] / max(a["peak_extra_mib"], floor)
                rows.append(make_row("dora", f"{theirs}/{ours}", shape, f"{kind}_time_ratio", speedup, "x"))
                rows.append(make_row("dora", f"{theirs}/{ours}", shape, f"{kind}_peak_ratio", mem, "x"))
                print(f"{kind:4s} {shape:28s} {theirs} / {ours}: time {speedup:6.2f}x, "
                      f"peak extra RSS {b['peak_extra_mib']:7.1f} vs {a['peak_extra_mib']:6.1f} MiB")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"loralab_factored": "tab:blue", "loralab": "tab:blue", "dense": "tab:gray", "peft": "tab:orange"}
    panels = [("norm_time", "row norm time (ms)"), ("norm_peak_extra_rss", "row norm peak extra RSS (MiB)"),
              ("step_time", "DoRA layer fwd+bwd (ms)"), ("step_peak_extra_rss", "DoRA layer peak extra RSS (MiB)")]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, (metric, title) in zip(axes, panels, strict=True):
        sel = [r for r in rows if r["metric"] == metric]
        shapes = sorted({r["shape"] for r in sel})
        providers = [p for p in colours if any(r["provider"] == p for r in sel)]
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            vals = [next((float(r["value"]) for r in sel if r["shape"] == s and r["provider"] == provider), 0.0)
                    for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=provider, color=colours[provider])
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(shapes))])
        ax.set_xticklabels([s.replace(",", "\n") for s in shapes], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"DoRA row norm: factored vs dense (CPU, {rows[0]['device'] if rows else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, nargs="+", default=[4096])
    p.add_argument("--r", type=int, nargs="+", default=[16, 64])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the existing CSV")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    csv_path, png_path = args.out / "dora.csv", args.out / "dora.png"
    if not args.plot_only:
        rows = run(args.d, args.r, args.tokens, args.repeat, args.threads)
        write_rows(csv_path, rows)
        print(f"wrote {csv_path}")
    plot(read_rows(csv_path), png_path)
    print(f"wrote {png_path}")


if __name__ == "__main__":
    main()
