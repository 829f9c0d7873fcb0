"""Shared set-up of the tour's experiments: paths, one short LoRA run on the main-job task.

Every experiment reuses the main job's pieces (`examples/task.py`, `training.py`,
`methods.py`, `gguf_loader.py`) so that its numbers are comparable with `make demo`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from examples.finetune import max_answer_tokens, pick_threads
from examples.methods import BLOCK_LINEARS, load_model
from examples.report import save_figure
from examples.task import make_splits
from examples.training import TrainConfig, evaluate, train
from lora import LoRAConfig, apply_lora, save_adapter, trainable_parameters

ROOT = Path(__file__).resolve().parents[2]

FIGURES = ROOT / "docs" / "figures"  # committed PNG + CSV of every experiment
RUNS = ROOT / "runs" / "experiments"  # adapters and other large outputs (not committed)
QV = ["q_proj", "v_proj"]  # LoRA sec. 7.1 / table 5: the paper's default targets


@dataclass
class RunConfig:
    """One short LoRA fine-tuning run of the main-job task (fp32 base: the rank question
    does not depend on the base's storage, and fp32 is the fastest on a CPU)."""

    r: int = 8  # LoRA rank
    alpha: float = 16  # LoRA alpha; scaling = alpha / r (LoRA sec. 4.1)
    targets: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))  # adapted layers
    steps: int = 6  # optimizer steps: few enough that the configurations differ (`make demo` uses 15)
    batch_size: int = 8  # examples per step, as in the demo
    lr: float = 1e-3  # the demo's LoRA learning rate
    n_train: int = 400  # generated training examples (the demo's split)
    n_eval: int = 50  # held-out examples scored by exact match
    seed: int = 0  # data order and A's initialisation


def short_run(cfg: RunConfig, save_to: Path | None = None) -> dict:
    """Load SmolLM2-135M, add LoRA, train, score held-out exact match; optionally save the adapter."""
    torch.manual_seed(cfg.seed)
    train_set, eval_set = make_splits(cfg.n_train, cfg.n_eval, cfg.seed)
    model, tok = load_model("lora")
    apply_lora(model, LoRAConfig(r=cfg.r, alpha=cfg.alpha, target_modules=list(cfg.targets)),
               dtype=torch.float32)
    trainable, _ = trainable_parameters(model)
    t0 = time.perf_counter()
    result = train(model, tok, train_set, TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size,
                                                      lr=cfg.lr, seed=cfg.seed),
                   desc=f"r={cfg.r} alpha={cfg.alpha:g} {'+'.join(t[0] for t in cfg.targets)}")
    train_s = time.perf_counter() - t0
    acc, _ = evaluate(model, tok, eval_set, batch_size=cfg.n_eval,
                      max_new_tokens=max_answer_tokens(tok, eval_set), desc="eval")
    if save_to is not None:
        save_adapter(model, save_to)
    return {"accuracy": acc, "final_loss": result.losses[-1], "trainable_params": trainable,
            "train_seconds": train_s, "model": model, "tok": tok, "eval_set": eval_set}


def setup_threads() -> int:
    """Use the idle cores (the machine is shared); returns the thread count."""
    n = pick_threads(0)
    torch.set_num_threads(n)
    return n


__all__ = ["FIGURES", "QV", "ROOT", "RUNS", "RunConfig", "evaluate", "max_answer_tokens",
           "save_figure", "setup_threads", "short_run"]
