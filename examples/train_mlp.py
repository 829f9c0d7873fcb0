"""LoRA in five steps on a toy problem: wrap a frozen MLP, train only A and B, save the
adapter, load it into a fresh copy, merge it away.

The target is the same MLP with a rank-2 change to each weight, so the frozen MLP cannot
fit it but LoRA with r=4 can (LoRA sec. 4: the update of a fine-tuned weight has low rank).

    python examples/train_mlp.py            # ~10 s on 2 CPU cores; writes train_mlp_out/loss.png
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lora import (
    LoRAConfig,
    apply_lora,
    load_adapter,
    merge_and_unload,
    print_trainable_parameters,
    save_adapter,
)


def make_problem(d: int, hidden: int, n: int, seed: int = 0):
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))
    target = copy.deepcopy(mlp)
    with torch.no_grad():
        for layer in (target[0], target[2]):
            out_f, in_f = layer.weight.shape
            layer.weight += torch.randn(out_f, 2) @ torch.randn(2, in_f) / 2  # a rank-2 change
    x = torch.randn(n, d)
    return mlp, x, target(x).detach()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in tqdm(range(steps), desc="training"):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    p = argparse.ArgumentParser(description="LoRA on a frozen random MLP")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("train_mlp_out"))
    args = p.parse_args(argv)

    mlp, x, y = make_problem(d=32, hidden=64, n=512)
    base = copy.deepcopy(mlp)  # an untouched copy, to load the adapter into later
    wrapped = apply_lora(mlp, LoRAConfig(r=args.r, alpha=args.r, target_modules=["0", "2"]))
    print("wrapped:", wrapped)
    print_trainable_parameters(mlp)
    losses = train(mlp, x, y, args.steps, args.lr)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.6f} ({losses[0] / losses[-1]:.0f}x lower)")

    with tempfile.TemporaryDirectory() as folder:
        save_adapter(mlp, folder)  # adapter_config.json + adapter_model.safetensors (PEFT's layout)
        load_adapter(base, folder)
    with torch.no_grad():
        same = torch.allclose(base(x), mlp(x), atol=1e-6)
        merged = merge_and_unload(base)  # plain nn.Linear layers again
        print(f"reloaded adapter gives the same outputs: {same}; after merge: "
              f"{torch.allclose(merged(x), mlp(x), atol=1e-5)}; layers: {[type(m).__name__ for m in merged]}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(losses)
    ax.set(xlabel="step", ylabel="MSE", title=f"LoRA r={args.r} on a frozen MLP")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "loss.png", dpi=120)
    print(f"wrote {args.out / 'loss.png'}")


if __name__ == "__main__":
    main()
