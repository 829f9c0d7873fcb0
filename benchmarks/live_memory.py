"""Peak bytes of live tensors during a piece of code, counted storage by storage.

`saved_activation_bytes` (lora.memory) counts what autograd saves; with gradient
checkpointing that is no longer the activation memory (checkpoint keeps block inputs in
its own closures and saves again while recomputing in backward), and neither counts
transients such as the logits' gradient. This tracker sees every tensor an operator
returns (a `TorchDispatchMode`), adds its storage's bytes while the storage lives (a weak
reference whose callback subtracts them when the storage is freed) and keeps the maximum.
The same definition serves every provider, so peaks compare like with like.

What it cannot see by itself: buffers an operator allocates and frees inside its own
kernel (a fused 4-bit linear's dequantized weight). `transient(func, args)` tells it how
many such bytes an operator holds while it runs; they count towards the peak at that call.

    with LivePeak(model, optimizer) as mem:
        step()
    mem.peak  # bytes
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LivePeak(TorchDispatchMode):
    """Track the bytes of live tensor storages; `peak` is the most seen at once.

    Tensors that exist before the block (`*owners`: modules and optimizers, whose
    parameters, buffers, gradients and states are counted) start the count; every
    storage an operator creates inside the block is added while it lives.
    """

    def __init__(self, *owners, transient=None):
        super().__init__()
        self._transient = transient
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # id(storage) -> (ref, bytes)
        self.current = 0
        self.peak = 0
        for owner in owners:
            for t in _tensors_of(owner):
                self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or t.is_sparse:
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._live or st.nbytes() == 0:
            return
        nbytes = st.nbytes()

        def freed(_ref, key=key, nbytes=nbytes):
            if self._live.pop(key, None) is not None:
                self.current -= nbytes

        # The storage's Python object lives exactly as long as the storage (PyTorch
        # preserves it), so the callback runs when the memory is released.
        self._live[key] = (weakref.ref(st, freed), nbytes)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._transient is not None:  # held inside the call, on top of what is live
            self.peak = max(self.peak, self.current + self._transient(func, args))
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def _tensors_of(owner) -> list[torch.Tensor]:
    if isinstance(owner, torch.nn.Module):
        ts = [*owner.parameters(), *owner.buffers()]
        ts += [p.grad for p in owner.parameters() if p.grad is not None]
        return ts
    if isinstance(owner, torch.optim.Optimizer):
        return [v for st in owner.state.values() for v in st.values() if torch.is_tensor(v)]
    if isinstance(owner, torch.Tensor):
        return [owner]
    raise TypeError(f"owners must be modules, optimizers or tensors, got {type(owner).__name__}")
