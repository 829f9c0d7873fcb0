"""Full fine-tuning of SmolLM2-135M in mixed precision: the memory estimator against one step.

Mixed precision (Micikevicius et al. 2018, sec. 3): fp32 master weights, gradients and AdamW
states (4 + 4 + 8 = 16 bytes per parameter) with the forward and backward in bf16 under
`torch.autocast`. The step is measured as `tests/test_memory.py` measures it: the tensors the
model and AdamW hold after the step (exact) plus what autograd saved during the forward
(saved-tensor hooks; autocast's cached bf16 weight copies included). Pure fp32 is measured
beside it, so the table shows what autocast changes.

    python examples/experiments/mixed_precision.py             # 4 x 128 random tokens, 2 threads
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.methods import load_model  # noqa: E402
from lora.memory import ModelSpec, estimate, saved_activation_bytes, tensor_bytes  # noqa: E402

MIB = 2**20


def measure(model, idx: torch.Tensor, autocast: bool) -> dict[str, int]:
    """Held bytes by kind after one AdamW step, plus the bytes autograd saved in its forward."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def loss_fn():
        logits = model(idx[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())  # fp32 under autocast

    with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=autocast):
        saved, loss = saved_activation_bytes(model, loss_fn)
    loss.backward()
    opt.step()
    held = tensor_bytes(model, opt)
    model.zero_grad(set_to_none=True)
    return {**held, "activations": saved}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for label, autocast in (("fp32", False), ("mixed precision (bf16 autocast)", True)):
        model, _ = load_model("full")  # a fresh model each time: no state carried over
        spec = ModelSpec.from_config(model.config)
        idx = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1))
        real = measure(model, idx, autocast)
        est = estimate(spec, "full", weight_dtype="fp32", batch_size=args.batch_size,
                       seq_len=args.seq_len, mixed_precision=autocast)
        rows.append((label, est, real))
        del model

    print(f"\nSmolLM2-135M, full fine-tuning, AdamW, {args.batch_size} x {args.seq_len} tokens "
          "(MiB; estimate / measured)")
    print("| mode | weights | gradients | optimizer states | activations | total |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, est, real in rows:
        total = sum(real.values())
        cells = [(est.weights, real["weights"]), (est.gradients, real["gradients"]),
                 (est.optimizer_states, real["optimizer_states"]), (est.activations, real["activations"]),
                 (est.total, total)]
        print(f"| {label} | " + " | ".join(f"{e / MIB:.1f} / {m / MIB:.1f}" for e, m in cells) + " |")


if __name__ == "__main__":
    main()
