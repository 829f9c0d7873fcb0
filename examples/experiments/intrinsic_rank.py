"""Intrinsic rank of the learned update (LoRA paper sec. 7.2, figure 3) and truncation.

    python examples/experiments/intrinsic_rank.py        # ~3 min after rank_sweep.py (~5 min without)

Compares the r = 8 and r = 64 adapters that `rank_sweep.py` trained (all linear layers,
same data, seed and step count; trained here if missing) with `lora.analysis`:

* phi(i, j) between A_r8 and A_r64 per layer, averaged over the 210 adapted layers; and
  the same for the learned part of A (A - A_init: a short run moves A little from its
  random initialisation) and for B^T (B starts at zero, so it is learned entirely);
* the random baseline: two random subspaces of dims i and j in R^d overlap by max(i, j)/d;
* how much of each r = 64 update B A a rank-k truncation keeps (energy), and the held-out
  accuracy of the r = 64 adapter truncated to rank k (`lora.analysis.truncate`).

Writes docs/figures/intrinsic_rank.csv, intrinsic_rank.png and truncation.png.
"""
from __future__ import annotations

import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tour_setup import (
    FIGURES,
    RUNS,
    RunConfig,
    evaluate,
    max_answer_tokens,
    save_figure,
    setup_threads,
    short_run,
)

from benchmarks.common import COLUMNS, make_row, write_rows
from lora import LoRAConfig, apply_lora, load_adapter
from lora.analysis import adapter_matrices, compare_adapters, energy_spectrum, truncate

RANKS = (8, 64)  # LoRA figure 3 compares r = 8 with r = 64
TRUNCATE_TO = (1, 2, 4, 8, 16, 64)
SHOW_IJ = ((1, 1), (1, 64), (4, 4), (8, 8), (8, 64))


def initial_adapters(r: int, seed: int = 0) -> dict:
    """The A matrices before training: replay short_run's seeded set-up (same RNG draws)."""
    from examples.methods import load_model
    from examples.task import make_splits

    torch.manual_seed(seed)
    make_splits(RunConfig.n_train, RunConfig.n_eval, seed)
    model, _ = load_model("lora")
    apply_lora(model, LoRAConfig(r=r, alpha=2.0 * r, target_modules=list(RunConfig().targets)),
               dtype=torch.float32)
    return adapter_matrices(model)


def mean_grid(grids: dict) -> torch.Tensor:
    return torch.stack(list(grids.values())).mean(0)  # (8, 64)


def main() -> int:
    setup_threads()
    t0 = time.perf_counter()
    for r in RANKS:
        if not (RUNS / f"r{r}" / "adapter_config.json").is_file():
            short_run(RunConfig(r=r, alpha=2.0 * r), RUNS / f"r{r}")
    trained = {r: adapter_matrices(RUNS / f"r{r}") for r in RANKS}
    init = {r: initial_adapters(r) for r in RANKS}
    kinds = {
        "A": {r: trained[r] for r in RANKS},
        "A - A_init": {r: {n: (a - init[r][n][0], b) for n, (a, b) in trained[r].items()} for r in RANKS},
        "B^T": {r: {n: (b.T, a) for n, (a, b) in trained[r].items()} for r in RANKS},
        "A_init": init,
    }
    grids = {k: compare_adapters(v[8], v[64], max_i=8, max_j=64) for k, v in kinds.items()}
    rows = []
    for kind, g in grids.items():
        mg = mean_grid(g)
        for i, j in SHOW_IJ:
            rows.append(make_row("intrinsic_rank", kind, f"i={i},j={j}", "phi_mean_over_layers",
                                 float(mg[i - 1, j - 1]), "fraction"))
        print(f"{kind:11s} mean phi: " + "  ".join(f"({i},{j}) {float(mg[i - 1, j - 1]):.3f}" for i, j in SHOW_IJ))
    dims = {n: a.shape[1] for n, (a, _) in trained[8].items()}
    dims_b = {n: b.shape[0] for n, (_, b) in trained[8].items()}
    for label, d in (("random, in_features", dims), ("random, out_features", dims_b)):
        for i, j in SHOW_IJ:
            val = sum(max(i, j) / v for v in d.values()) / len(d)
            rows.append(make_row("intrinsic_rank", label, f"i={i},j={j}", "phi_mean_over_layers", val, "fraction"))
        print(f"{label:21s} baseline: " + "  ".join(f"({i},{j}) {sum(max(i, j) / v for v in d.values()) / len(d):.3f}"
                                                   for i, j in SHOW_IJ))
    # Energy of each r = 64 update B A kept by rank k.
    spectra = {n: energy_spectrum(b.double() @ a.double())[:64] for n, (a, b) in trained[64].items()}
    mean_energy = torch.stack(list(spectra.values())).mean(0)  # (64,)
    for k in TRUNCATE_TO:
        rows.append(make_row("intrinsic_rank", "r=64 update", f"k={k}", "energy_kept_mean", float(mean_energy[k - 1]), "fraction"))
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        sel = torch.stack([s for n, s in spectra.items() if n.endswith(suffix)]).mean(0)  # (64,)
        for k in (1, 8):
            rows.append(make_row("intrinsic_rank", f"r=64 update, {suffix}", f"k={k}", "energy_kept_mean",
                                 float(sel[k - 1]), "fraction"))
        print(f"  {suffix:9s} energy kept at rank 1: {float(sel[0]):.3f}, rank 8: {float(sel[7]):.3f}")
    print("mean energy of B A (r=64) kept at rank k: " + "  ".join(f"k={k} {float(mean_energy[k - 1]):.3f}" for k in TRUNCATE_TO))
    accs = truncated_accuracy(trained[64])
    for k, acc in accs.items():
        rows.append(make_row("intrinsic_rank", "r=64 truncated", f"k={k}", "accuracy", acc, "fraction"))
    rows.append(make_row("intrinsic_rank", "all", "-", "total_seconds", time.perf_counter() - t0, "s"))
    write_rows(FIGURES / "intrinsic_rank.csv", [{c: r[c] for c in COLUMNS} for r in rows])
    plot_grids(grids, dims, FIGURES / "intrinsic_rank.png")
    plot_truncation(spectra, mean_energy, accs, FIGURES / "truncation.png")
    print(f"total {time.perf_counter() - t0:.0f} s; wrote docs/figures/intrinsic_rank.csv, intrinsic_rank.png, truncation.png")
    return 0


def truncated_accuracy(adapter64: dict) -> dict[int, float]:
    """Held-out exact match of the r = 64 adapter with every layer's B A cut to rank k."""
    from examples.methods import load_model
    from examples.task import make_splits

    cfg = RunConfig(r=64, alpha=128.0)
    _, eval_set = make_splits(cfg.n_train, cfg.n_eval, cfg.seed)
    model, tok = load_model("lora")
    apply_lora(model, LoRAConfig(r=64, alpha=128.0, target_modules=list(cfg.targets)), dtype=torch.float32)
    load_adapter(model, RUNS / "r64")
    layers = dict(model.named_modules())
    out = {}
    for k in TRUNCATE_TO:
        with torch.no_grad():
            for name, (A, B) in adapter64.items():
                A_k, B_k = truncate(A, B, k)
                layers[name].lora_A["default"].weight.copy_(A_k)
                layers[name].lora_B["default"].weight.copy_(B_k)
        out[k], _ = evaluate(model, tok, eval_set, batch_size=len(eval_set),
                             max_new_tokens=max_answer_tokens(tok, eval_set), desc=f"eval rank {k}")
        print(f"r=64 adapter truncated to rank {k:2d}: held-out exact match {100 * out[k]:.0f}%")
    return out


def plot_grids(grids: dict, dims: dict, path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(13, 2.6))
    for ax, (kind, g) in zip(axes, grids.items(), strict=True):
        im = ax.imshow(mean_grid(g).numpy(), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                       extent=(0.5, 64.5, 0.5, 8.5))
        ax.set_title(f"phi({kind}: r=8, r=64)", fontsize=9)
        ax.set_xlabel("j (r = 64)")
    axes[0].set_ylabel("i (r = 8)")
    fig.colorbar(im, ax=axes, shrink=0.9)
    fig.suptitle("subspace similarity, mean over the 210 adapted layers (LoRA sec. 7.2)", fontsize=10, y=1.04)
    save_figure(fig, path)
    plt.close(fig)


def plot_truncation(spectra: dict, mean_energy: torch.Tensor, accs: dict, path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    k = torch.arange(1, 65)
    for suffix in ("q_proj", "v_proj", "down_proj"):
        sel = [s for n, s in spectra.items() if n.endswith(suffix)]
        ax1.plot(k, torch.stack(sel).mean(0), label=suffix)
    ax1.plot(k, mean_energy, "k--", label="all layers")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("rank k kept")
    ax1.set_ylabel("share of ||B A||_F^2 kept")
    ax1.legend(fontsize=8)
    ax1.set_title("r = 64 updates: energy by rank")
    ax2.plot(list(accs), [100 * a for a in accs.values()], "o-")
    ax2.set_xscale("log", base=2)
    ax2.set_ylim(-3, 103)
    ax2.set_xlabel("rank k kept (every layer)")
    ax2.set_ylabel("held-out exact match (%)")
    ax2.set_title("r = 64 adapter truncated to rank k")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
