"""Mixed-adapter batches on one layer (CPU): loralab's segments vs one adapter vs PEFT's mixed batch.

A (d, d) frozen nn.Linear with n LoRA adapters (r = 16), a batch of 64 rows (one token each
by default) spread over n in {1, 4, 16, 64} adapters in a random order. Providers, timed
round-robin in the same run (median of `--repeat` rounds):

- `single_adapter`: loralab `LoRALinear` with one active adapter (no mixed batch): the goal's baseline;
- `loralab_mixed`: loralab inside `use_adapters(layer, names)` (every adapter in two batched
  matmuls), entered once per batch as a model's forward or a `generate()` loop enters it: the
  row plan (one sort into segments) is computed once per batch and shared by every layer, so
  a layer call does not pay for it. Its cost is reported on its own as `plan_ms` (a fresh plan,
  timed right after the base matmul as the first layer of a model would pay it);
- `peft_mixed`: PEFT's `lora.Linear` with the same adapters, `layer(x, adapter_names=names)`
  (PEFT groups the rows again in every layer).

Metrics: forward (no grad) and forward+backward (x and every adapter's A, B require grad) in
ms, and the ratios to `single_adapter` and to `peft_mixed` (goals: 16 adapters <= 1.15x one
adapter; never slower than PEFT). A ratio is the median over rounds of that round's ratio
(the providers run back to back in each round, so a machine that slows down for a while
slows both). Writes benchmarks/results/multi_adapter.csv and .png.

    python benchmarks/multi_adapter.py             # d = 4096, 64 rows, 1/4/16/64 adapters
    python benchmarks/multi_adapter.py --quick     # d = 1024, fewer rounds (code path check)
    python benchmarks/multi_adapter.py --threads 1 --clock cpu   # CPU time, for a busy shared machine
    PYTHONPATH=. python benchmarks/multi_adapter.py --gpu --out DIR   # CUDA: kernels vs loop vs PEFT
    TRITON_INTERPRET=1 python benchmarks/multi_adapter.py --gpu --quick --out /tmp/x   # its code path on CPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS_DIR, make_row, read_rows, write_rows  # noqa: E402
from lora import LoRALinear  # noqa: E402
from lora.mixed_batch import use_adapters  # noqa: E402

BENCH = "multi_adapter"
GOALS = {"ratio_16_vs_single": 1.15, "ratio_vs_peft": 1.0}


def build(d: int, n: int, r: int, dtype=torch.float32, device="cpu") -> dict[str, nn.Module]:
    """loralab layer with n adapters, the one-adapter layer, and PEFT's layer with the same weights.

    All three wrap one shared frozen base layer: separate copies of a 64 MB weight differ in
    matmul time by up to ~20% on a CPU depending on where their pages land (measured here: the
    same addmm on three identical copies took 29, 31 and 35 ms, the order kept across runs),
    which would swamp the LoRA part being compared."""
    torch.manual_seed(0)
    base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    ours = LoRALinear.from_linear(base, r=r, alpha=2 * r, adapter_name="a0", dtype=dtype)
    for i in range(1, n):
        ours.add_adapter(f"a{i}", r=r, alpha=2 * r, dtype=dtype)
    with torch.no_grad():
        for i in range(n):
            ours.lora_B[f"a{i}"].weight.normal_(std=0.01)
    ours.set_adapter([f"a{i}" for i in range(n)])  # all trainable (fwd+bwd reaches every adapter)
    single = LoRALinear.from_linear(base, r=r, alpha=2 * r, adapter_name="a0", dtype=dtype)
    single.load_state_dict({k: v for k, v in ours.state_dict().items() if ".a0." in k}, strict=False)
    providers = {"single_adapter": single, "loralab_mixed": ours}
    try:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["x"], init_lora_weights=False)
            theirs = PeftLinear(base, "a0", cfg, r=r, lora_alpha=2 * r)
            for i in range(1, n):
                theirs.update_layer(f"a{i}", r, 2 * r, cfg)
            theirs.to(device=device, dtype=dtype)
            with torch.no_grad():
                for i in range(n):
                    theirs.lora_A[f"a{i}"].weight.copy_(ours.lora_A[f"a{i}"].weight)
                    theirs.lora_B[f"a{i}"].weight.copy_(ours.lora_B[f"a{i}"].weight)
            for pname, q in theirs.named_parameters():
                q.requires_grad_("lora_" in pname)
        providers["peft_mixed"] = theirs
    except ImportError:
        print("peft not installed: skipped")
    return providers


def row_names(rows: int, n: int, seed: int = 0) -> list[str]:
    """Rows spread evenly over n adapters, in a random order."""
    g = torch.Generator().manual_seed(seed)
    names = [f"a{i % n}" for i in range(rows)]
    return [names[i] for i in torch.randperm(rows, generator=g).tolist()]


def call(name: str, module: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """One layer call; `loralab_mixed` runs inside the `use_adapters(module, names)` block that
    the caller holds open (`measure`)."""
    if name == "peft_mixed":
        return module(x, adapter_names=names)
    return module(x)


def plan_ms(module: nn.Module, x: torch.Tensor, names: list[str], repeat: int, tick) -> float:
    """Median time of a fresh row plan and its chunk layout for `module`'s adapters, each timed
    right after the layer's base matmul (as a model's first layer pays it)."""
    from lora.row_batch import RowAdapters

    adapters = [n for n in module.r if n in set(names)]
    times = []
    for _ in range(repeat):
        with torch.no_grad():
            module.base_layer(x)
        t0 = tick()
        RowAdapters(tuple(names)).plan(x.numel() // x.shape[-1], x.device).layout(adapters)
        times.append(tick() - t0)
    return statistics.median(times) * 1e3


def check_same(providers, x, names) -> None:
    """The mixed providers agree (so the timing compares equal work)."""
    with torch.no_grad(), use_adapters(providers["loralab_mixed"], names):
        outs = {k: call(k, m, x, names) for k, m in providers.items() if k != "single_adapter"}
    ref = outs["loralab_mixed"]
    for k, v in outs.items():
        torch.testing.assert_close(v, ref, atol=1e-4, rtol=1e-4, msg=f"{k} differs from loralab_mixed")


def step(name, module, x, names, backward: bool):
    if not backward:
        with torch.no_grad():
            call(name, module, x, names)
        return
    xg = x.detach().requires_grad_(True)
    call(name, module, xg, names).sum().backward()
    for p in module.parameters():
        p.grad = None


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of the round's a / b (both timed in the same round)."""
    return statistics.median(ta / tb for ta, tb in zip(a, b, strict=True))


def measure(d: int, rows: int, seq: int, counts, r: int, repeat: int, clock: str = "wall") -> list[dict]:
    """Rows of the CSV. `clock="cpu"`: CPU time of this process (`time.process_time`) instead of
    wall time, which leaves out the time the process waits while other processes hold the cores
    (on a shared machine); meaningful with one thread (`--threads 1`: with more, a thread
    spinning while it waits for a descheduled sibling counts as busy)."""
    tick = time.process_time if clock == "cpu" else time.perf_counter
    tag = f",threads={torch.get_num_threads()},clock=cpu" if clock == "cpu" else ""
    out = []
    for n in tqdm(counts, desc="adapters"):
        providers = build(d, n, r)
        names = row_names(rows, n)
        x = torch.randn(rows, seq, d) if seq > 1 else torch.randn(rows, d)
        check_same(providers, x, names)
        shape = f"d={d},rows={rows},seq={seq},r={r}{tag},adapters={n}"
        for backward in (False, True):
            times = {k: [] for k in providers}
            with use_adapters(providers["loralab_mixed"], names):  # once per batch, as in a model
                for k, m in providers.items():  # warm up
                    step(k, m, x, names, backward)
                for _ in range(repeat):  # round-robin: each round times every provider once
                    for k, m in providers.items():
                        t0 = tick()
                        step(k, m, x, names, backward)
                        times[k].append(tick() - t0)
            metric = "fwd_bwd_ms" if backward else "fwd_ms"
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            for k, v in med.items():
                out.append(make_row(BENCH, k, shape, metric, v, "ms"))
            out.append(make_row(BENCH, "loralab_mixed", shape, f"{metric}_ratio_vs_single",
                                paired_ratio(times["loralab_mixed"], times["single_adapter"]), "x"))
            if "peft_mixed" in med:
                out.append(make_row(BENCH, "loralab_mixed", shape, f"{metric}_ratio_vs_peft",
                                    paired_ratio(times["loralab_mixed"], times["peft_mixed"]), "x"))
                out.append(make_row(BENCH, "peft_mixed", shape, f"{metric}_ratio_vs_single",
                                    paired_ratio(times["peft_mixed"], times["single_adapter"]), "x"))
        out.append(make_row(BENCH, "loralab_mixed", shape, "plan_ms",
                            plan_ms(providers["loralab_mixed"], x, names, repeat, tick), "ms"))
    return out


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, ("fwd_ms", "fwd_bwd_ms"), strict=True):
        for provider in ("loralab_mixed", "peft_mixed"):
            pts = sorted((int(r["shape"].split("adapters=")[1]), float(r["value"])) for r in rows
                         if r["provider"] == provider and r["metric"] == f"{metric}_ratio_vs_single")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=provider)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(GOALS["ratio_16_vs_single"], color="grey", ls="--", lw=0.8, label="goal at 16 adapters")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapters in the batch")
        ax.set_title(metric.replace("_ms", "").replace("_", "+"))
    axes[0].set_ylabel("time / one adapter (same batch)")
    axes[0].legend()
    shape = rows[0]["shape"].split(",adapters")[0] if rows else ""
    fig.suptitle(f"Mixed-adapter batch on one layer, CPU ({shape})", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)
    return path


def summary(rows: list[dict]) -> None:
    for r in rows:
        if "ratio" in r["metric"] or r["metric"] == "plan_ms":
            print(f"{r['provider']:14s} {r['shape']:45s} {r['metric']:26s} {float(r['value']):.3f}")


# ----- CUDA (make gpu-check): the LoRA part of a mixed batch, d = 4096, r = 16, 16 adapters -----
def _gpu_rows(tokens: int, n: int, d: int, r: int, out: list, t0: float, budget_s: float,
              dev: str = "cuda") -> None:
    from lora.row_segments import stack_weights
    from loralab_kernels.segmented import lora_segments
    from quant import LinearNF4

    if dev == "cuda":
        import triton.testing

        bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50)  # noqa: E731
    else:  # the smoke run under the interpreter: checks the code path, not the speed
        from benchmarks.common import time_cpu

        bench = lambda fn: time_cpu(fn, warmup=1, repeat=1) * 1e3  # noqa: E731
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, d, device=dev, dtype=dt, generator=g)
    As = [torch.randn(r, d, device=dev, dtype=dt, generator=g) / d**0.5 for _ in range(n)]
    Bs = [torch.randn(d, r, device=dev, dtype=dt, generator=g) / r**0.5 for _ in range(n)]
    scal = torch.full((n,), 2.0, device=dev)
    names = row_names(tokens, n)
    rows_of = [[i for i, nm in enumerate(names) if nm == f"a{j}"] for j in range(n)]
    order = torch.tensor(sum(rows_of, []), device=dev)
    bounds = [0]
    for rr in rows_of:
        bounds.append(bounds[-1] + len(rr))
    a_stack, b_stack = stack_weights(As, 0).to(dt), stack_weights(Bs, 1).to(dt)
    idx = [torch.tensor(rr, device=dev) for rr in rows_of]
    y = torch.zeros(tokens, d, device=dev, dtype=dt)
    base = LinearNF4(d, d, bias=False, compute_dtype=dt, device=dev)

    def loop():  # one torch.matmul pair per adapter, gather and scatter by index
        for j in range(n):
            y.index_add_(0, idx[j], (x[idx[j]] @ As[j].T * 2.0) @ Bs[j].T)

    fns = {"nf4_base_layer": lambda: base(x),
           "segmented_kernels": lambda: lora_segments(x, y, order, bounds, list(range(n)), a_stack, b_stack, scal),
           "torch_loop": loop}
    try:
        if dev != "cuda":  # the smoke run skips PEFT (its import alone takes seconds)
            raise ImportError
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear

        dense = nn.Linear(d, d, bias=False, device=dev, dtype=dt).requires_grad_(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["x"], init_lora_weights=False)
            peft_layer = PeftLinear(dense, "a0", cfg, r=r, lora_alpha=2 * r)
            for j in range(1, n):
                peft_layer.update_layer(f"a{j}", r, 2 * r, cfg)
        peft_layer.to(device=dev, dtype=dt)
        fns["dense_base_layer"] = lambda: dense(x)
        fns["peft_mixed_layer"] = lambda: peft_layer(x, adapter_names=names)
    except ImportError:
        pass
    shape = f"d={d},tokens={tokens},r={r},adapters={n}"
    with torch.no_grad():  # the kernels add what the loop adds (bf16: h and y rounded, 2^-8 each)
        ref = torch.zeros(tokens, d, device=dev)
        for j in range(n):
            ref.index_add_(0, idx[j], (x[idx[j]].float() @ As[j].float().T * 2.0) @ Bs[j].float().T)
        got = lora_segments(x, torch.zeros_like(y), order, bounds, list(range(n)), a_stack, b_stack, scal)
        err = (got.float() - ref).abs().max().item()
        if err > 0.02 * ref.abs().max().item():
            raise AssertionError(f"segmented kernels off by {err:.3g} at {shape}")
    ms = {}
    with torch.no_grad():
        for k, fn in fns.items():
            if time.time() - t0 > budget_s:
                print(f"multi_adapter --gpu: budget spent, skipped {k} at {shape}")
                continue
            ms[k] = bench(fn)
            out.append(make_row(BENCH, k, shape, "ms", ms[k], "ms", device=dev))
    if "peft_mixed_layer" in ms and "dense_base_layer" in ms:  # PEFT's LoRA part: its layer minus its base
        ms["peft_lora_part"] = max(ms["peft_mixed_layer"] - ms["dense_base_layer"], 0.0)
        out.append(make_row(BENCH, "peft_mixed", shape, "lora_part_ms", ms["peft_lora_part"], "ms", device=dev))
    for k in ("segmented_kernels", "torch_loop", "peft_lora_part"):
        if k in ms and "nf4_base_layer" in ms:
            out.append(make_row(BENCH, k, shape, "fraction_of_nf4_base", ms[k] / ms["nf4_base_layer"], "x",
                                device=dev))
    if "segmented_kernels" in ms:
        for peer in ("torch_loop", "peft_lora_part"):
            if ms.get(peer):
                out.append(make_row(BENCH, "segmented_kernels", shape, f"speedup_vs_{peer}",
                                    ms[peer] / ms["segmented_kernels"], "x", device=dev))


def gpu_section(out_dir: Path, budget_s: float = 120.0, smoke: bool = False) -> int:
    """The segmented kernels vs a torch.matmul loop vs PEFT's mixed batch, 64 and 512 tokens
    over 16 adapters, against the NF4 base layer's time (goal: LoRA part <= 10% of it).
    Writes multi_adapter_gpu.csv to `out_dir`; 0 when every size wrote rows. `smoke`: tiny
    sizes on the CPU under TRITON_INTERPRET=1 (the dry run of `make gpu-check`)."""
    if not smoke and not torch.cuda.is_available():
        print("multi_adapter --gpu: no CUDA, skipped")
        return 0
    t0, rows, ok = time.time(), [], True
    sizes = [(8, 4, 128, 4), (40, 4, 128, 4)] if smoke else [(64, 16, 4096, 16), (512, 16, 4096, 16)]
    for tokens, n, d, r in sizes:
        try:
            _gpu_rows(tokens, n, d, r, rows, t0, budget_s, dev="cpu" if smoke else "cuda")
        except Exception as exc:  # report and go on: the other size may still run
            print(f"multi_adapter --gpu: tokens={tokens} failed: {exc!r}")
            ok = False
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rows(out_dir / f"{BENCH}_gpu.csv", rows)
    for row in rows:
        print(f"{row['provider']:18s} {row['shape']:36s} {row['metric']:28s} {float(row['value']):.4g}")
    return 0 if ok and rows else 1

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seq", type=int, default=1, help="tokens per row")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time (use with --threads 1 on a shared machine); writes "
                        f"{BENCH}_cpu_clock.csv/.png")
    p.add_argument("--quick", action="store_true", help="d = 1024, 5 rounds, 1/4/16 adapters")
    p.add_argument("--gpu", action="store_true", help="the CUDA kernel section (see gpu_section)")
    p.add_argument("--budget-s", type=float, default=120.0, help="--gpu: time limit")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--plot-only", action="store_true")
    a = p.parse_args(argv)
    if a.gpu:
        return gpu_section(a.out, a.budget_s, smoke=a.quick)
    name = BENCH if a.clock == "wall" else f"{BENCH}_cpu_clock"
    csv = a.out / f"{name}.csv"
    if a.plot_only:
        print(plot(read_rows(csv), a.out / f"{name}.png"))
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.d, a.repeat, a.adapters = 1024, 5, [1, 4, 16]
    rows = measure(a.d, a.rows, a.seq, a.adapters, a.rank, a.repeat, a.clock)
    write_rows(csv, rows)
    summary(rows)
    print(plot(rows, a.out / f"{name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
