"""Forward+backward time of one LoRA layer on the CPU: loralab vs PEFT vs loralib vs a frozen nn.Linear.

All providers wrap the same frozen (d, d) weight, see the same input (tokens, d) with
`requires_grad=True` (a layer in the middle of a network), and are timed round-robin in
the same run (median of `--repeat` rounds), because this machine is shared and noisy.
Writes benchmarks/results/lora_layer.csv and lora_layer.png and prints the ratios.

    python benchmarks/lora_layer.py                      # d in {1024, 4096}, r in {8, 16, 64}, fp32 + bf16
    python benchmarks/lora_layer.py --d 1024 --repeat 3  # quicker
    python benchmarks/lora_layer.py --plot-only          # redraw the PNG from the CSV
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS_DIR, make_row, read_rows, time_cpu, write_rows  # noqa: E402
from lora import LoRALinear  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_providers(d: int, r: int, dtype: torch.dtype) -> dict[str, nn.Module]:
    """One module per provider, all over a copy of the same frozen base (alpha = 2r)."""
    torch.manual_seed(0)
    base = nn.Linear(d, d).to(dtype).requires_grad_(False)
    providers = {"frozen_linear": base,
                 "loralab": LoRALinear.from_linear(copy.deepcopy(base), r=r, alpha=2 * r, dtype=dtype)}
    if dtype != torch.float32:  # our default keeps float32 adapters over a half-precision base
        providers["loralab_fp32_adapters"] = LoRALinear.from_linear(copy.deepcopy(base), r=r, alpha=2 * r)
    try:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["x"])
            providers["peft"] = PeftLinear(copy.deepcopy(base), "default", cfg, r=r, lora_alpha=2 * r).to(dtype)
    except ImportError:
        print("peft not installed: skipped")
    try:
        import loralib
        lib = loralib.Linear(d, d, r=r, lora_alpha=2 * r)
        lib.load_state_dict(base.state_dict(), strict=False)
        providers["loralib"] = lib.to(dtype)
    except ImportError:
        print("loralib not installed: skipped")
    for module in providers.values():
        module.train()
        with torch.no_grad():  # a non-zero B, as after some training (timing does not depend on it)
            for name, p in module.named_parameters():
                if p.requires_grad and "B" in name:
                    p.normal_(std=0.01)
    return providers


def step_fn(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(grad_out)
    return step


def run(ds, ranks, dtypes, tokens, repeat, threads):
    torch.set_num_threads(threads)
    rows, times = [], {}
    configs = [(dn, d, r) for dn in dtypes for d in ds for r in ranks]
    for dname, d, r in tqdm(configs, desc="configs"):
        dtype = DTYPES[dname]
        providers = make_providers(d, r, dtype)
        torch.manual_seed(1)
        x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(tokens, d, dtype=dtype)
        steps = {name: step_fn(m, x, grad_out) for name, m in providers.items()}
        for step in steps.values():  # warm-up
            step()
        samples = {name: [] for name in steps}
        for _ in range(repeat):  # round-robin: every provider sees the same machine load
            for name, step in steps.items():
                samples[name].append(time_cpu(step, warmup=0, repeat=1))
        shape = f"tokens={tokens},d={d},r={r},{dname}"
        for name, s in samples.items():
            med = statistics.median(s)
            times[(dname, d, r, name)] = med
            rows.append(make_row("lora_layer", name, shape, "fwd_bwd_time", med * 1e3, "ms"))
        frozen, ours = times[(dname, d, r, "frozen_linear")], times[(dname, d, r, "loralab")]
        rows.append(make_row("lora_layer", "loralab", shape, "ratio_vs_frozen_linear", ours / frozen, "x"))
        for peer in ("peft", "loralib"):
            if (dname, d, r, peer) in times:
                rows.append(make_row("lora_layer", "loralab", shape, f"ratio_vs_{peer}",
                                     ours / times[(dname, d, r, peer)], "x"))
    return rows, times


def times_from_rows(rows: list[dict]) -> dict:
    """{(dtype, d, r, provider): seconds} from the CSV rows (so plots come from the CSV)."""
    times = {}
    for row in rows:
        if row["metric"] != "fwd_bwd_time":
            continue
        fields = dict(kv.split("=") for kv in row["shape"].split(",") if "=" in kv)
        dname = row["shape"].rsplit(",", 1)[1]
        times[(dname, int(fields["d"]), int(fields["r"]), row["provider"])] = float(row["value"]) / 1e3
    return times


def plot(times, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(dn, d) for dn, d, _, _ in times})
    colors = {"frozen_linear": "black", "loralab": "tab:blue", "loralab_fp32_adapters": "tab:cyan",
              "peft": "tab:orange", "loralib": "tab:green"}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, (dname, d) in zip(axes[0], keys, strict=True):
        ranks = sorted({r for dn, dd, r, _ in times if (dn, dd) == (dname, d)})
        names = sorted({n for dn, dd, _, n in times if (dn, dd) == (dname, d)})
        for name in names:
            ax.plot(range(len(ranks)), [times[(dname, d, r, name)] * 1e3 for r in ranks], marker="o",
                    label=name, color=colors.get(name), linestyle="--" if name == "frozen_linear" else "-")
        ax.set(title=f"d={d}, {dname}", xlabel="rank r", ylabel="fwd+bwd ms (median)")
        ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="lower center", ncol=len(handles))
    fig.subplots_adjust(bottom=0.25)
    fig.suptitle("One LoRA layer, forward + backward, CPU (2 threads, 2048 tokens)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--r", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the existing CSV")
    args = p.parse_args(argv)
    csv_path = args.out / "lora_layer.csv"
    if args.plot_only:
        times = times_from_rows(read_rows(csv_path))
    else:
        rows, times = run(args.d, args.r, args.dtype, args.tokens, args.repeat, args.threads)
        write_rows(csv_path, rows)
    plot(times, args.out / "lora_layer.png")
    print(f"{'config':<34} {'loralab ms':>10} {'/frozen':>8} {'/peft':>7} {'/loralib':>8}")
    for dn, d, r, name in sorted(times):
        if name != "loralab":
            continue
        t = times[(dn, d, r, name)]
        ratio = {peer: t / times[(dn, d, r, peer)] if (dn, d, r, peer) in times else float("nan")
                 for peer in ("frozen_linear", "peft", "loralib")}
        print(f"d={d:<5} r={r:<3} {dn:<6}{'':15} {t * 1e3:10.1f} {ratio['frozen_linear']:8.3f} "
              f"{ratio['peft']:7.3f} {ratio['loralib']:8.3f}")
    print(f"wrote {csv_path} and {args.out / 'lora_layer.png'}")


if __name__ == "__main__":
    main()
