"""LoRA / QLoRA training of a tiny Llama on one or several processes (DDP or FSDP2).

Run on one process, or launch the same script with `torchrun`:

    python examples/train_distributed.py --out dist_out                      # one process
    torchrun --nproc_per_node=2 examples/train_distributed.py --out dist_out  # 2 CPU processes (gloo)
    torchrun --nproc_per_node=8 examples/train_distributed.py --out dist_out  # 8 GPUs (nccl)

Every rank builds the same seeded model and the same global batch, and takes its own
rows of it; DDP averages the gradients, so N processes with the global batch B train
exactly what one process with B trains (up to float summation order). Only trainable
parameters get gradients, so DDP all-reduces the adapters alone; a communication hook
counts the bytes. `--modes fsdp` shards the model with FSDP2 (`fully_shard`) instead; it
all-gathers the frozen base for each forward/backward but reduce-scatters adapter
gradients only (both counted).

Output (rank 0): `<out>/<method>-<mode>/` with the adapter files,
`<out>/<method>-<mode>.json` with the losses and the counted bytes, and
`<out>/<method>-<mode>-grads.safetensors` with each step's averaged adapter gradients
(keys `step<i>.<parameter name>`), which tests/test_distributed.py compares with one process.

`--faults` adds runs with a deliberate DDP bug, so the test can show that its parity check
catches each one: "no-allreduce" (ranks never communicate), "sum" (gradients summed, not
averaged), "wrong-shard" (every rank trains on rank 0's rows).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

import lora.qlora  # noqa: F401  (registers QLoRALinear as the LoRA wrapper of quant.LinearNF4)
from examples.llama import Llama, LlamaConfig
from lora import LoRAConfig, apply_lora, save_adapter, trainable_parameters
from quant import quantize_model
from quant.atomic_file import atomic_write

BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("lora", "qlora")
MODES = ("ddp", "fsdp")
OPTIMIZERS = ("adamw", "sgd")
FAULTS = ("none", "no-allreduce", "sum", "wrong-shard")


@dataclass
class TrainConfig:
    """One training run; every rank must get the same values."""

    method: str = "lora"  # "lora" (fp32 base) or "qlora" (NF4 base, QLoRA sec. 3)
    mode: str = "ddp"  # "ddp" (replicated model) or "fsdp" (FSDP2 fully_shard); ignored on one process
    steps: int = 4  # optimizer steps; a handful checks equivalence, hundreds train
    global_batch: int = 8  # sequences per step over all ranks; must divide by the world size
    seq_len: int = 16  # tokens per sequence
    r: int = 4  # LoRA rank (LoRA sec. 4.1)
    alpha: float = 8.0  # LoRA scaling numerator (LoRA sec. 4.1)
    lr: float = 1e-2  # learning rate; LoRA takes larger rates than full fine-tuning
    optimizer: str = "adamw"  # "adamw" to train; "sgd" for parity tests (Adam's 1/sqrt(v) magnifies rounding)
    seed: int = 0  # model, adapter and data seed: identical on every rank
    fault: str = "none"  # a deliberate DDP bug from FAULTS (tests only)

    def __post_init__(self):
        for name, allowed in (("method", METHODS), ("mode", MODES), ("optimizer", OPTIMIZERS), ("fault", FAULTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def run_name(self) -> str:
        return f"{self.method}-{self.mode}" + ("" if self.fault == "none" else f"-{self.fault}")


def tiny_config() -> LlamaConfig:
    """A Llama small enough to train in a second on a CPU core."""
    return LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                       max_seq_len=64)


def build_model(cfg: TrainConfig) -> nn.Module:
    """The seeded tiny Llama with adapters on every block linear (NF4 base for QLoRA)."""
    torch.manual_seed(cfg.seed)
    model = Llama(tiny_config())
    nn.init.normal_(model.model.embed_tokens.weight, std=0.02)  # GPT-2's init; N(0, 1) tied logits start huge
    if cfg.method == "qlora":
        quantize_model(model, target_modules=BLOCK_LINEARS, compute_dtype=torch.float32)
    apply_lora(model, LoRAConfig(r=cfg.r, alpha=cfg.alpha, target_modules=BLOCK_LINEARS), dtype=torch.float32)
    return model


def make_batches(cfg: TrainConfig) -> torch.Tensor:
    """(steps, global_batch, seq_len + 1) token ids: a learnable pattern (next = 3 * prev + 1 mod V) from random starts."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    vocab = tiny_config().vocab_size
    start = torch.randint(0, vocab, (cfg.steps, cfg.global_batch, 1), generator=g)
    tokens = [start]
    for _ in range(cfg.seq_len):
        tokens.append((3 * tokens[-1] + 1) % vocab)
    return torch.cat(tokens, dim=-1)  # (steps, global_batch, seq_len + 1)


class ByteCounter:
    """DDP communication hook state: all-reduces each gradient bucket (mean) and counts its bytes."""

    def __init__(self, world_size: int, average: bool = True):
        self.world_size = world_size
        self.average = average  # False is the "sum" fault: a wrong averaging factor
        self.bytes = 0
        self.buckets = 0

    @staticmethod
    def hook(state, bucket):  # no annotations: DDP compares them to dist.GradBucket, and they are strings here
        """All-reduce the mean of one `dist.GradBucket`; returns a Future of the reduced buffer."""
        buf = bucket.buffer()
        state.bytes += buf.numel() * buf.element_size()
        state.buckets += 1
        if state.average:
            buf.div_(state.world_size)
        return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])


class CollectiveCounter:
    """Counts the full (unsharded) bytes of FSDP's all-gathers and reduce-scatters while active.

    FSDP2 calls `dist.all_gather_single` / `dist.reduce_scatter_single` (torch >= 2.12) or the
    `*_into_tensor` / `*_tensor` names (older); whichever exist are wrapped."""

    NAMES = {"all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
             "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter"}

    def __init__(self):
        self.bytes = {"all_gather": 0, "reduce_scatter": 0}
        self._saved = {}

    def __enter__(self):
        for name, kind in self.NAMES.items():
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def counted(*args, _original=original, _kind=kind, **kwargs):
                full = args[0] if _kind == "all_gather" else (args[1] if len(args) > 1 else kwargs["input"])
                if "output_tensor" in kwargs and _kind == "all_gather":
                    full = kwargs["output_tensor"]
                self.bytes[_kind] += full.numel() * full.element_size()
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def wrap(model: nn.Module, cfg: TrainConfig, world_size: int) -> tuple[nn.Module, ByteCounter | None]:
    """DDP with a byte-counting hook, or FSDP2 over each block then the root."""
    if world_size == 1 or cfg.fault == "no-allreduce":
        return model, None
    if cfg.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        # No buffer sync before each forward: the frozen NF4 codes are buffers, identical on every rank.
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else {"broadcast_buffers": False}
        ddp = DDP(model, device_ids=device_ids, **sync)
        counter = ByteCounter(world_size, average=cfg.fault != "sum")
        ddp.register_comm_hook(counter, ByteCounter.hook)
        return ddp, counter
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model, None


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors as plain full tensors (FSDP2 holds DTensor shards; gather them)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()
    return out


def full_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters' gradients as plain full tensors (FSDP2 shards them; a collective)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.detach()
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).cpu().clone()
    return out


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr)


def train(cfg: TrainConfig, rank: int = 0, world_size: int = 1,
          device: str = "cpu") -> tuple[nn.Module, dict, list[dict[str, torch.Tensor]]]:
    """Train on this rank's rows of each global batch. Returns (plain model with the trained
    adapters, metrics, gradients) where metrics has the losses and the communicated bytes and
    gradients holds each step's averaged adapter gradients by parameter name."""
    if cfg.global_batch % world_size:
        raise ValueError(f"global_batch ({cfg.global_batch}) must be divisible by the world size ({world_size})")
    model = build_model(cfg).to(device)
    trainable, total = trainable_parameters(model)
    wrapped, counter = wrap(model, cfg, world_size)
    opt = make_optimizer(cfg, [p for p in wrapped.parameters() if p.requires_grad])
    local = cfg.global_batch // world_size
    shard = 0 if cfg.fault == "wrong-shard" else rank
    losses, grads = [], []
    collectives = CollectiveCounter()
    if world_size > 1 and cfg.mode == "fsdp":
        collectives.__enter__()
    bar = tqdm(make_batches(cfg), desc=f"{cfg.method}-{cfg.mode if world_size > 1 else 'single'}",
               disable=rank != 0, leave=False)
    for batch in bar:
        rows = batch[shard * local:(shard + 1) * local].to(device)  # (local, seq_len + 1)
        logits = wrapped(rows[:, :-1])  # (local, seq_len, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))  # (local*seq_len, vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append(full_gradients(model))
        opt.step()
        mean = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(mean)
            mean /= world_size
        losses.append(mean.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    collectives.__exit__(None, None, None)
    state = full_adapter_state(model)
    plain = build_model(cfg)  # a fresh unsharded copy carries the trained adapters
    with torch.no_grad():
        params = dict(plain.named_parameters())
        for name, t in state.items():
            params[name].copy_(t)
    trainable_bytes = sum(t.numel() * t.element_size() for t in state.values())
    metrics = {"config": asdict(cfg), "world_size": world_size, "losses": losses,
               "trainable_params": trainable, "all_params": total, "trainable_bytes": trainable_bytes,
               "allreduce_bytes": counter.bytes if counter else 0, "allreduce_buckets": counter.buckets if counter else 0,
               "fsdp_all_gather_bytes": collectives.bytes["all_gather"],
               "fsdp_reduce_scatter_bytes": collectives.bytes["reduce_scatter"],
               "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values())}
    return plain, metrics, grads


def write_json_atomic(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for adapters and metrics")
    parser.add_argument("--methods", default="lora,qlora", help=f"comma-separated, from {METHODS}")
    parser.add_argument("--modes", default="ddp", help=f"comma-separated, from {MODES} (several processes only)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--global-batch", type=int, default=TrainConfig.global_batch)
    parser.add_argument("--optimizer", default=TrainConfig.optimizer, choices=OPTIMIZERS)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--faults", default="", help=f"comma-separated DDP bugs to run too (tests), from {FAULTS[1:]}")
    args = parser.parse_args(argv)
    methods, modes = args.methods.split(","), args.modes.split(",")
    faults = [f for f in args.faults.split(",") if f]
    for name, values, allowed in (("--methods", methods, METHODS), ("--modes", modes, MODES),
                                  ("--faults", faults, FAULTS[1:])):
        if not set(values) <= set(allowed):
            parser.error(f"{name} must be a comma-separated subset of {allowed}, got {values}")

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = "cpu"
    if world_size > 1:
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    else:
        modes = ["single"]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(method, mode, "none") for method in methods for mode in modes]
    runs += [(method, "ddp", fault) for method in methods for fault in faults if world_size > 1]
    try:
        for method, mode, fault in runs:
            cfg = TrainConfig(method=method, mode=mode if mode != "single" else "ddp", steps=args.steps,
                              global_batch=args.global_batch, optimizer=args.optimizer, lr=args.lr, fault=fault)
            model, metrics, grads = train(cfg, rank, world_size, device)
            name = cfg.run_name if mode != "single" else f"{method}-single"
            if rank == 0:
                save_adapter(model, args.out / name)
                write_json_atomic(args.out / f"{name}.json", metrics)
                flat = {f"step{i}.{k}": g for i, step in enumerate(grads) for k, g in step.items()}
                atomic_write(args.out / f"{name}-grads.safetensors", lambda tmp, flat=flat: save_file(flat, tmp))
                print(f"{name}: world {world_size}, loss {metrics['losses'][0]:.4f} -> "
                      f"{metrics['losses'][-1]:.4f}, all-reduced {metrics['allreduce_bytes']:,d} bytes "
                      f"({metrics['trainable_bytes']:,d} adapter bytes x {cfg.steps} steps); FSDP all-gathered "
                      f"{metrics['fsdp_all_gather_bytes']:,d}, reduce-scattered {metrics['fsdp_reduce_scatter_bytes']:,d}",
                      flush=True)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
