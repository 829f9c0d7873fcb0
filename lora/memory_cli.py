"""Command line of the memory estimator: one Markdown table, one column per method.

    python -m lora.memory --config llama-3-8b --method qlora --r 16
    python -m lora.memory_cli --config smollm2-135m --method full --mixed-precision
"""
from __future__ import annotations

import argparse
import sys

from .memory import _DTYPES, METHODS, OPTIMIZERS, PRESETS, estimate, format_table


def _positive_int_arg(text: str) -> int:
    """argparse type: a positive int (argparse turns the ValueError into a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora.memory",
                                description="How much memory does fine-tuning take? An estimate, part by part.")
    p.add_argument("--config", default="llama-3-8b", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--method", default="all", help="full, lora, qlora or all (side by side)")
    p.add_argument("--r", type=_positive_int_arg, default=16)
    p.add_argument("--weight-dtype", default=None, choices=sorted(_DTYPES), help="default bf16 (fp32 with --mixed-precision)")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    p.add_argument("--batch-size", type=_positive_int_arg, default=1)
    p.add_argument("--seq-len", type=_positive_int_arg, default=512)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", action="store_true",
                   help="full fine-tuning: fp32 master weights and AdamW, bf16 autocast compute")
    args = p.parse_args(argv)
    if args.mixed_precision and args.method not in ("full", "all"):
        p.error(f"--mixed-precision applies to --method full, got --method {args.method}")
    if args.weight_dtype is None:
        args.weight_dtype = "fp32" if args.mixed_precision else "bf16"
    if args.config not in PRESETS:
        p.error(f"--config must be one of {sorted(PRESETS)}, got {args.config!r}")
    if args.method != "all" and args.method not in METHODS:
        p.error(f"--method must be one of {METHODS} or 'all', got {args.method!r}")
    methods = ("full",) if args.mixed_precision else METHODS if args.method == "all" else (args.method,)
    spec = PRESETS[args.config]
    try:
        est = {m: estimate(spec, m, r=args.r, weight_dtype=args.weight_dtype,
                           optimizer=args.optimizer, batch_size=args.batch_size,
                           seq_len=args.seq_len, grad_checkpointing=args.grad_checkpointing,
                           act_dtype=None if args.mixed_precision else args.weight_dtype,
                           mixed_precision=args.mixed_precision)
               for m in methods}
    except (ValueError, TypeError) as err:  # a one-line usage error, never a traceback
        p.error(str(err))
    print(f"{spec.name}: {spec.num_parameters():,} parameters; r={args.r}, all linear layers, "
          f"{args.weight_dtype} weights, {args.optimizer}, batch {args.batch_size} x "
          f"{args.seq_len} tokens{', gradient checkpointing' if args.grad_checkpointing else ''}"
          f"{', bf16 autocast (mixed precision)' if args.mixed_precision else ''}")
    print(format_table(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
