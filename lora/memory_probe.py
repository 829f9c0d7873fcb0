"""What a live process really holds: tensor bytes, autograd's saved activations, RSS.

The measurements the estimator (`lora.memory`) is checked against: `tensor_bytes` counts
the storages of a model's weights, gradients and optimizer states; `saved_activation_bytes`
records what autograd saves with `torch.autograd.graph.saved_tensors_hooks`;
`memory_usage` reads the process's RSS (Linux `/proc/self/statm`, else the peak from
`getrusage`) and, with CUDA, the allocator's counters.
"""
from __future__ import annotations

import os
import resource
from typing import Callable

import torch
import torch.nn as nn

from .memory import fmt_bytes


def saved_activation_bytes(model: nn.Module, fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct tensors autograd saves while `fn()` runs (not the model's
    own parameters and buffers, which are weights). Returns (bytes, fn's result)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking no arguments, got {type(fn).__name__}")
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def tensor_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes the model and optimizer really hold: weights (parameters and buffers),
    gradients, optimizer states. Shared tensors are counted once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    def nbytes(ts):
        uniq = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}
        return sum(uniq.values())
    weights = nbytes([*model.parameters(), *model.buffers()])
    grads = nbytes([p.grad for p in model.parameters() if p.grad is not None])
    states = []
    if optimizer is not None:
        for st in optimizer.state.values():
            states += [v for v in st.values() if torch.is_tensor(v)]
    return {"weights": weights, "gradients": grads, "optimizer_states": nbytes(states)}


def memory_usage() -> dict[str, int]:
    """Current and peak memory of this process (and of the GPU when there is one), bytes."""
    out = {"rss": 0, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/statm") as f:
            out["rss"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        out["rss"] = out["peak_rss"]
    # The kernel keeps its rss counters per CPU and folds them in lazily, so ru_maxrss can lag
    # the statm figure read a moment later by a few hundred KB; a peak is never below now.
    out["peak_rss"] = max(out["peak_rss"], out["rss"])
    if torch.cuda.is_available():
        out["gpu_allocated"] = torch.cuda.memory_allocated()
        out["gpu_peak_allocated"] = torch.cuda.max_memory_allocated()
    return out


def print_memory_usage() -> None:
    """Print the process's (and GPU's) current and peak memory, e.g. after loading a model."""
    u = memory_usage()
    line = f"process memory: {fmt_bytes(u['rss'])} (peak {fmt_bytes(u['peak_rss'])})"
    if "gpu_allocated" in u:
        line += (f" || GPU memory: {fmt_bytes(u['gpu_allocated'])} "
                 f"(peak {fmt_bytes(u['gpu_peak_allocated'])})")
    print(line)
