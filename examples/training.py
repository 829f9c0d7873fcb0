"""Batching, the training loop and evaluation (exact match, content score) for the fine-tuning demo."""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from examples.llama import Llama, upcast
from examples.scoring import scores
from examples.task import CHATML, ChatFormat, Example, completion, prompt

IGNORE = -100  # label of prompt and padding tokens: no loss there (train on the answer only)


def encode_example(tok, example: Example, shots: list[Example] = (), fmt: ChatFormat = CHATML
                   ) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer, and labels with the prompt masked out."""
    p = tok.encode(prompt(example, shots, fmt))
    a = tok.encode(completion(example, fmt))
    return p + a, [IGNORE] * len(p) + a


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest; returns input ids (B, T) and next-token targets (B, T).

    Right padding needs no attention mask: with causal attention no real token sees a pad.
    """
    T = max(len(ids) for ids, _ in pairs) - 1
    idx = torch.full((len(pairs), T), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(pairs), T), IGNORE, dtype=torch.long)  # (B, T)
    for b, (ids, labels) in enumerate(pairs):
        idx[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[b, :len(ids) - 1] = torch.tensor(labels[1:])  # token t predicts label t+1
    return idx, targets


def lm_loss(model, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens.

    The vocabulary projection runs on the scored positions only: the same loss as
    `cross_entropy(model(idx), targets, ignore_index=IGNORE)`, with a third of the work.
    The in-repo `Llama` also leaves out what no scored position sees (`Llama.hidden`'s
    `lengths`): with causal attention a row's tokens after its last scored position (its
    padding) change nothing, and the prefix every row shares is computed once."""
    keep = targets != IGNORE  # (B, T)
    if isinstance(model, Llama):
        steps = torch.arange(1, targets.shape[1] + 1, device=targets.device)  # (T,)
        lengths = (keep * steps).amax(1).clamp(min=1) if keep.numel() else None  # (B,) last scored + 1
        h = model.hidden(idx, lengths=lengths)[keep]  # (N, dim): the N answer positions
    else:
        h = model.hidden(idx)[keep]
    logits = model.lm_head(h)  # (N, vocab)
    return F.cross_entropy(upcast(logits), targets[keep])


@dataclass
class TrainConfig:
    """Optimisation settings of the demo (sized for a few minutes on 2 CPU cores)."""

    steps: int = 40  # optimizer steps; the JSON format is learnt in about 20 (NOTES.md)
    batch_size: int = 8  # examples per step
    lr: float = 1e-3  # peak AdamW learning rate; LoRA tolerates ~10x full fine-tuning's
    warmup: int = 4  # linear warm-up steps, then cosine decay to 10% of lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    seed: int = 0  # data order


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # training loss of each step's batch
    step_seconds: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)

    @property
    def seconds_per_step(self) -> float:
        """Median seconds per step, leaving out the first (allocator warm-up)."""
        times = sorted(self.step_seconds[1:] or self.step_seconds)
        return times[len(times) // 2] if times else float("nan")


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def mean_loss(model, tok, examples: list[Example], fmt: ChatFormat = CHATML, batch_size: int = 16
              ) -> float:
    """Answer-token cross-entropy over `examples` (each token weighs the same)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        idx, targets = collate([encode_example(tok, ex, fmt=fmt) for ex in examples[i:i + batch_size]],
                               tok.pad_id)
        n = int((targets != IGNORE).sum())
        total, count = total + lm_loss(model, idx, targets).item() * n, count + n
    return total / count


def train(model, tok, examples: list[Example], cfg: TrainConfig, desc: str = "train",
          fmt: ChatFormat = CHATML, eval_examples: list[Example] = (), eval_every: int = 0
          ) -> TrainResult:
    """AdamW on the parameters with requires_grad, one batch of `cfg.batch_size` per step.

    With `eval_every` > 0, the loss on `eval_examples` is measured every that many steps
    and after the last (a held-out curve next to the training one shows overfitting)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    encoded = [encode_example(tok, ex, fmt=fmt) for ex in examples]
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    result = TrainResult()
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, unit="step")
    for step in bar:
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(encoded), generator=gen).tolist()
        batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
        idx, targets = collate([encoded[i] for i in batch], tok.pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        t0 = time.perf_counter()
        loss = lm_loss(model, idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.step_seconds.append(time.perf_counter() - t0)
        result.losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if eval_every > 0 and eval_examples and ((step + 1) % eval_every == 0 or step + 1 == cfg.steps):
            result.eval_losses.append((step + 1, mean_loss(model, tok, eval_examples, fmt)))
            model.train()
    model.eval()
    return result


@torch.no_grad()
def predict(model, tok, examples: list[Example], shots: list[Example] = (),
            batch_size: int = 25, max_new_tokens: int = 32, desc: str = "eval",
            fmt: ChatFormat = CHATML) -> list[str]:
    """Greedy answers to the examples' prompts, decoded without special tokens."""
    model.eval()
    out: list[str] = []
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False):
        chunk = examples[i:i + batch_size]
        prompts = [tok.encode(prompt(ex, shots, fmt)) for ex in chunk]
        generated = model.generate(prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_id)
        out += [tok.decode(g) for g in generated]
    return out


def evaluate(model, tok, examples: list[Example], shots: list[Example] = (), **kw
             ) -> tuple[float, list[str]]:
    """Exact-match accuracy and the predictions."""
    scored, preds = evaluate_scores(model, tok, examples, shots, **kw)
    return scored["exact"], preds


def evaluate_scores(model, tok, examples: list[Example], shots: list[Example] = (), **kw
                    ) -> tuple[dict, list[str]]:
    """{"exact": ..., "content": ... or None} (`scoring.scores`) and the predictions."""
    preds = predict(model, tok, examples, shots, **kw)
    return scores(preds, [e.answer for e in examples]), preds


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
