"""QLoRA fine-tuning of SmolLM2-135M-Instruct on the CPU, end to end.

    python examples/finetune.py                  # the demo: --method qlora on the "extract" task
    python examples/finetune.py --task route     # a task whose content must be learnt (runs/route)
    python examples/finetune.py --method lora    # bf16/fp32 base instead of NF4
    python examples/finetune.py --bits 3 --init loftq  # NF3 base, LoftQ start (docs/06-starting-points.md)
    python examples/finetune.py --compare        # every method on the same task and budget
    python examples/finetune.py --data my.jsonl  # your own examples (see owndata.py; runs/own_data)
    python examples/finetune.py --generate "text" --adapter runs/finetune/adapter

The demo loads the model from its GGUF file (or a Hugging Face safetensors folder),
quantizes every linear layer of the blocks to NF4 with double quantization (QLoRA
sec. 3), puts LoRA on all of them, trains, and prints held-out exact match and
content score before/after, parameter counts, weight bytes, adapter size, peak memory
and seconds per step. It saves the adapter in PEFT's layout, reloads it into a freshly
loaded model and checks the score.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from examples import routing, task
from examples.answer import answer, write_prompt_file
from examples.chat_format import chat_format
from examples.methods import (
    BITS,
    INITS,
    METHODS,
    PROMPT_INIT_TEXT,
    TRAINED,
    base_weight_bytes,
    check_init_and_bits,
    load_model,
    prepare,
    reload_adapter,
    save_what_must_be_saved,
)
from examples.owndata import load_jsonl, split
from examples.report import atomic_write_text
from examples.task import CHATML, ChatFormat, Example, completion, prompt
from examples.training import TrainConfig, evaluate_scores, peak_rss_bytes, train


@dataclass(frozen=True)
class TaskSpec:
    """A built-in generated task."""

    make_splits: Callable  # (n_train, n_eval, seed) -> (train, held-out) lists of Example
    wrap: Callable[[str], Example]  # an input text -> its Example (for --generate)
    title: str  # shown in reports
    steps: int  # default optimizer steps: enough for ~95% held-out on this task
    prompt_init: str  # soft prompt tuning starts from this text's embeddings (Lester sec. 2.2)


TASKS = {
    "extract": TaskSpec(task.make_splits, task.wrap, "JSON extraction", 15, PROMPT_INIT_TEXT),
    "route": TaskSpec(routing.make_splits, routing.wrap, "message routing", 40,
                      "Route the customer message to the team code that handles its topic."),
}
OWN_DATA_STEPS = 30  # default steps on --data: about 2 passes over 100 examples at batch 8
DEFAULT_LR = {"qlora": 1e-3, "lora": 1e-3, "adapter": 1e-3, "full": 3e-5, "prompt": 3e-2}  # LoRA takes ~10x full FT's lr (QLoRA app. B uses 2e-4 for long runs)


@dataclass
class FinetuneConfig:
    """Everything one run depends on; the defaults are `make demo`."""

    method: str = "qlora"  # one of METHODS
    task: str = "extract"  # built-in task (TASKS): "extract" teaches a format, "route" new content
    data: str | None = None  # a JSONL file of your own examples instead of a built-in task
    eval_fraction: float = 0.2  # with data: share held out for scoring (seeded split)
    steps: int | None = None  # optimizer steps; None: the task's default (15 extract, 40 route, 30 data)
    eval_loss_every: int | None = None  # held-out loss every N steps; None: 5 points on --data, off otherwise
    batch_size: int = 8  # examples per step
    lr: float | None = None  # None: DEFAULT_LR[method]
    r: int = 16  # LoRA rank; r=16 on all linear layers is QLoRA's recipe (sec. 4)
    alpha: float = 32  # LoRA alpha; scaling alpha / r = 2
    init: str = "kaiming"  # adapter start (INITS): kaiming/gaussian B = 0; loftq, pissa, olora rewrite the base
    bits: int = 4  # qlora's base: 4 NF4, 3 NF3, 2 NF2 (stored in 4 bits); fewer bits, more error to repair
    dropout: float = 0.0  # LoRA dropout; 40 steps are too few to overfit
    n_train: int = 400  # generated training examples (built-in tasks)
    n_eval: int = 100  # generated held-out examples (built-in tasks)
    shots: int = 4  # examples in the prompt for few-shot in-context learning
    compute_dtype: str = "float32"  # NF4 dequantizes to this; bf16 matmuls are slow on most CPUs
    grad_checkpointing: bool = False  # keep only block inputs, recompute in backward: less memory, ~1/3 more compute
    eval_batch: int = 100  # prompts per generate() call: one dequantization serves the whole batch
    threads: int = 0  # torch threads; 0 = the idle cores (a busy CPU makes OpenMP crawl)
    seed: int = 0  # data and initialisation
    show: int = 3  # example generations to print before/after
    reload: bool = True  # save, reload into a fresh model, re-score
    out: str = "runs/finetune"  # adapter, loss curve, CSV
    gguf: str | None = None  # a Llama GGUF file or HF safetensors folder; default SmolLM2-135M-Instruct


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


def load_examples(cfg: FinetuneConfig) -> tuple[list[Example], list[Example], str]:
    """(train, held-out, title): the user's file split by `eval_fraction`, or a built-in
    task. Every check on the data runs here, before anything is loaded or written."""
    if cfg.data is not None:
        train_set, eval_set = split(load_jsonl(cfg.data), cfg.eval_fraction, cfg.seed)
        return train_set, eval_set, f"your data ({Path(cfg.data).name})"
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    spec = TASKS[cfg.task]
    return (*spec.make_splits(cfg.n_train, cfg.n_eval, cfg.seed), spec.title)


def steps_of(cfg: FinetuneConfig) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return OWN_DATA_STEPS if cfg.data is not None else TASKS[cfg.task].steps


def eval_loss_every(cfg: FinetuneConfig, steps: int) -> int:
    """Built-in tasks skip the held-out loss (their scores are the measure, and it costs
    seconds per point); your data gets about five points along the run."""
    if cfg.eval_loss_every is not None:
        return cfg.eval_loss_every
    return max(1, steps // 5) if cfg.data is not None else 0


def format_of(cfg: FinetuneConfig, tok) -> tuple[ChatFormat, str]:
    """Built-in tasks: the ChatML prompt they were measured with; your data: the model's template."""
    if cfg.data is None:
        return CHATML, "ChatML without a system turn (as the built-in tasks were measured)"
    return chat_format(tok)


def check_lengths(tok, examples: list[Example], fmt: ChatFormat, max_len: int) -> None:
    """ValueError naming the line of the first example longer than the model accepts."""
    for ex in examples:
        n = len(tok.encode(prompt(ex, (), fmt) + completion(ex, fmt)))
        if n > max_len:
            raise ValueError(f"line {ex.line}: the example is {n} tokens long; this model "
                             f"takes at most {max_len}")


def run(cfg: FinetuneConfig, load=load_model) -> dict:
    """One method end to end; returns the measured figures (also written as JSON)."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    check_init_and_bits(cfg.method, cfg.init, cfg.bits, dtype_of(cfg.compute_dtype))
    train_set, eval_set, title = load_examples(cfg)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model, tok = load(cfg.method, cfg.gguf, dtype_of(cfg.compute_dtype), cfg.bits, cfg.init)
    print(f"loaded {cfg.gguf or 'SmolLM2-135M-Instruct'} in {time.perf_counter() - t0:.1f} s")
    model.grad_checkpointing = cfg.grad_checkpointing  # examples/llama.py's switch
    fmt, fmt_name = format_of(cfg, tok)
    if cfg.data is not None:
        check_lengths(tok, train_set + eval_set, fmt, model.config.max_seq_len)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bf16_bytes, _ = base_weight_bytes(model)
    init = "vocab" if cfg.data is not None else tok.encode(TASKS[cfg.task].prompt_init)
    model, info = prepare(model, cfg.method, cfg.r, cfg.alpha, cfg.dropout, dtype_of(cfg.compute_dtype),
                          prompt_init=init, init=cfg.init, bits=cfg.bits)
    shots = train_set[:{"one-shot": 1, "few-shot": cfg.shots}.get(cfg.method, 0)]  # ICL only
    eval_kw = dict(batch_size=cfg.eval_batch, max_new_tokens=generation_budget(tok, eval_set), fmt=fmt)
    res = {"method": cfg.method, "init": cfg.init, "bits": cfg.bits, "task_name": title,
           "model_name": Path(cfg.gguf).name if cfg.gguf else "SmolLM2-135M-Instruct", "chat_format": fmt_name, "n_train": len(train_set),
           "n_eval": len(eval_set), **info, "base_bf16_bytes": bf16_bytes,
           "base_stored_bytes": base_weight_bytes(model)[1], "steps": 0}
    t0 = time.perf_counter()
    preds_before = record_scores(res, "before", *evaluate_scores(model, tok, eval_set, shots,
                                                                 desc="eval before", **eval_kw))
    res["eval_seconds"] = time.perf_counter() - t0
    res["acc"], res["content"], preds_after = res["acc_before"], res["content_before"], preds_before
    if cfg.method in TRAINED:
        tcfg = TrainConfig(steps=steps_of(cfg), batch_size=cfg.batch_size,
                           lr=cfg.lr or DEFAULT_LR[cfg.method], seed=cfg.seed)
        result = train(model, tok, train_set, tcfg, desc=f"{cfg.method} train", fmt=fmt,
                       eval_examples=eval_set, eval_every=eval_loss_every(cfg, tcfg.steps))
        res.update(steps=tcfg.steps, lr=tcfg.lr, losses=result.losses, eval_losses=result.eval_losses,
                   seconds_per_step=result.seconds_per_step)
        preds_after = record_scores(res, "after", *evaluate_scores(model, tok, eval_set,
                                                                   desc="eval after", **eval_kw))
    res["saved_bytes"] = save_what_must_be_saved(model, cfg.method, out / "adapter")
    if cfg.method in ("lora", "qlora"):
        write_prompt_file(out / "adapter", cfg.method, None if cfg.data else cfg.task, cfg.bits)
    res["peak_rss_bytes_before_reload"] = peak_rss_bytes()
    if cfg.reload and cfg.method in ("lora", "qlora"):
        del model
        gc.collect()
        fresh, _ = load(cfg.method, cfg.gguf, dtype_of(cfg.compute_dtype), cfg.bits, cfg.init)
        reload_adapter(fresh, cfg.method, out / "adapter", dtype_of(cfg.compute_dtype), cfg.bits)
        preds_reloaded = record_scores(res, "reloaded", *evaluate_scores(
            fresh, tok, eval_set, desc="eval reloaded", **eval_kw))
        res["same_predictions_reloaded"] = sum(a == b for a, b in
                                               zip(preds_after, preds_reloaded, strict=True))
    res["peak_rss_bytes"] = peak_rss_bytes()
    res["examples"] = [{"sentence": ex.shown, "expected": ex.answer, "before": b, "after": a}
                       for ex, b, a in zip(eval_set[:cfg.show], preds_before, preds_after, strict=False)]
    res["prompt_example"] = prompt(eval_set[0], shots, fmt)
    return res


SCORE_KEYS = {"before": ("acc_before", "content_before"), "after": ("acc", "content"),
              "reloaded": ("acc_reloaded", "content_reloaded")}


def record_scores(res: dict, when: str, scored: dict, preds: list[str]) -> list[str]:
    """Store exact match and content score under `when`'s keys; return the predictions."""
    exact_key, content_key = SCORE_KEYS[when]
    res[exact_key], res[content_key] = scored["exact"], scored["content"]
    return preds


def max_answer_tokens(tok, examples) -> int:
    """Longest expected answer in tokens, + end of turn + a newline: a longer output
    cannot be an exact match."""
    return max(len(tok.encode(ex.answer)) for ex in examples) + 2


def generation_budget(tok, examples) -> int:
    """New tokens per answer when scoring: room for the content score too. A base model
    often writes the right fields in a longer layout (one per line, indented, in a code
    fence); cut at the answer's own length, it would lose fields it knows."""
    return 2 * max_answer_tokens(tok, examples) + 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = FinetuneConfig()
    p.add_argument("--method", default=defaults.method, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--task", default=defaults.task, choices=list(TASKS),
                   help="built-in task: extract (the base model knows the content, not the format) "
                        "or route (made-up team codes: the content itself must be learnt)")
    p.add_argument("--data", default=None, help="JSONL file of your own examples: "
                   '{"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}]} per line')
    p.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction,
                   help="with --data: share of the examples held out for scoring")
    p.add_argument("--eval-loss-every", type=int, default=None,
                   help="held-out loss every N steps (default: 5 points with --data, none otherwise)")
    p.add_argument("--compare", action="store_true", help="run every method and compare them")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: 15 for extract, 40 for route, 30 for --data)")
    for name in ("batch_size", "r", "n_train", "n_eval", "shots", "eval_batch",
                 "threads", "seed", "show"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    p.add_argument("--lr", type=float, default=None, help="default: per method " + str(DEFAULT_LR))
    p.add_argument("--alpha", type=float, default=defaults.alpha)
    p.add_argument("--dropout", type=float, default=defaults.dropout)
    p.add_argument("--init", default=defaults.init, choices=list(INITS),
                   help="how the LoRA adapter starts: kaiming or gaussian (B = 0), or from the weight: loftq "
                        "(qlora only), pissa, olora (docs/06-starting-points.md)")
    p.add_argument("--bits", type=int, default=defaults.bits, choices=list(BITS),
                   help="with --method qlora: the base's NormalFloat width (4 NF4, 3 NF3, 2 NF2; all stored in 4 bits)")
    p.add_argument("--compute-dtype", default=defaults.compute_dtype, choices=["float32", "bfloat16"])
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block in backward instead of keeping its activations")
    p.add_argument("--no-reload", action="store_true", help="skip the save/reload check")
    p.add_argument("--out", default=None, help="output folder (default: runs/finetune for the default "
                   "task, runs/<task> for another task, runs/own_data with --data, runs/compare)")
    p.add_argument("--gguf", "--model", dest="gguf", default=None,
                   help="a Llama-architecture GGUF file, or a Hugging Face folder with config.json, "
                        "model.safetensors and tokenizer.json")
    p.add_argument("--generate", default=None, metavar="TEXT",
                   help="answer TEXT with the adapter: the one --adapter names, else the one trained now")
    p.add_argument("--adapter", default=None, help="with --generate: a saved LoRA adapter folder "
                   "(no training)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="with --generate")
    p.add_argument("--methods", nargs="+", default=None, help="with --compare: which methods")
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)  # --compare's worker output
    return p


def default_out(args: argparse.Namespace) -> str:
    """Each kind of run gets its own folder, so training on another task or on your data does
    not overwrite the adapter `make demo` saved in runs/finetune."""
    if args.compare:
        return "runs/compare"
    if args.data is not None:
        return "runs/own_data"
    return FinetuneConfig.out if args.task == FinetuneConfig.task else f"runs/{args.task}"


def parse_args(argv=None) -> tuple[FinetuneConfig, argparse.Namespace]:
    p = build_parser()
    args = p.parse_args(argv)
    if args.method not in METHODS:
        p.error(f"unknown method {args.method!r}; choose one of: {', '.join(METHODS)}")
    if args.adapter is not None and args.generate is None:
        p.error("--adapter is used with --generate (to answer a prompt with a saved adapter)")
    if args.generate is not None and args.adapter is None and args.method not in ("lora", "qlora"):
        p.error("--generate after training needs --method lora or qlora (or a saved --adapter)")
    if args.data is not None and args.compare:
        p.error("--compare runs the built-in tasks; use --data with one --method at a time")
    if args.adapter is not None and (args.init != "kaiming" or args.bits != 4):
        p.error("--adapter: the saved adapter's folder records its base's bits and its init "
                "(loralab_prompt.json, adapter_config.json); --init and --bits are not taken")
    if args.compare and (args.init != "kaiming" or args.bits != 4):
        p.error("--init and --bits apply to one --method (lora or qlora), not to --compare")
    try:
        check_init_and_bits(args.method, args.init, args.bits, dtype_of(args.compute_dtype))
    except ValueError as e:
        p.error(str(e))
    cfg = FinetuneConfig(method=args.method, task=args.task, data=args.data,
                         eval_fraction=args.eval_fraction, eval_loss_every=args.eval_loss_every,
                         steps=args.steps, lr=args.lr,
                         alpha=args.alpha, dropout=args.dropout, compute_dtype=args.compute_dtype,
                         init=args.init, bits=args.bits,
                         reload=not args.no_reload, grad_checkpointing=args.grad_checkpointing,
                         out=args.out or default_out(args),
                         gguf=args.gguf, **{n: getattr(args, n) for n in (
                             "batch_size", "r", "n_train", "n_eval", "shots",
                             "eval_batch", "threads", "seed", "show")})
    return cfg, args


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    cfg.threads = pick_threads(cfg.threads)
    torch.set_num_threads(cfg.threads)
    if args.adapter is not None:
        return print_answer(cfg, args, Path(args.adapter))
    try:
        if args.compare:
            from examples.compare import compare
            return compare(cfg, args.methods)
        t0 = time.perf_counter()
        res = run(cfg)
        res["total_seconds"] = time.perf_counter() - t0
        res["threads"] = cfg.threads
        res["config"] = asdict(cfg)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res))
    else:
        from examples.report import report
        report(res, Path(cfg.out))
    if args.generate is not None:
        return print_answer(cfg, args, Path(cfg.out) / "adapter")
    return 0


def print_answer(cfg: FinetuneConfig, args, adapter: Path) -> int:
    """--generate: answer the text with the adapter in `adapter`; 2 on bad input."""
    try:
        text = answer(args.generate, adapter, cfg.gguf, dtype_of(cfg.compute_dtype),
                      {name: spec.wrap for name, spec in TASKS.items()},
                      max_new_tokens=args.max_new_tokens)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nprompt: {args.generate}\nanswer: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
