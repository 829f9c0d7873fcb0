"""The CPU kernels of the `loralab` 4-bit ops: the one-pass C loop of `quant.native`.

Registered for the "cpu" device of each op in quant/ops.py, here where the C loop lives.
Each call picks its dequantize loop from `quant.force_backend` (quant/backend.py): "auto"
takes the C loop when it is built (else PyTorch), "torch" the PyTorch reference, "native"
and "portable" the C loop (or an error). The C loop computes the PyTorch path's exact
bits, so the choice changes speed, never a number.

"triton" on CPU tensors (the tests, under `TRITON_INTERPRET=1`) hands the call to the
op's "cuda" kernel, where `loralab_kernels` registers Triton, through the dispatcher
(`redispatch`); quant never imports kernels, and without a registered CUDA kernel it raises.
"""
from __future__ import annotations

import torch

from . import native, ops
from .backend import requested_backend

_CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def cpu_loop() -> str:
    """"torch", "native", "portable" or "triton": what the CPU kernels run now."""
    backend = requested_backend()
    if backend == "auto":
        return "native" if native.available() else "torch"
    if backend in ("torch", "triton"):
        return backend
    if not native.available():
        raise RuntimeError(f"impl='native' (or force_backend({backend!r})) needs the C dequantizer "
                           f"({native.reason()})")
    return backend


def _triton(op, args):
    """Run `op` on its "cuda" kernel (Triton, registered by `loralab_kernels`) with these CPU tensors."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"):
        raise RuntimeError("force_backend('triton') on CPU tensors needs `import loralab_kernels` (which "
                           "registers the Triton kernels) and TRITON_INTERPRET=1; on a GPU, pass CUDA tensors")
    return op.redispatch(_CUDA, *args)


def dequantize(*args):
    loop = cpu_loop()
    return _triton(ops.DEQUANTIZE, args) if loop == "triton" else ops.reference_dequantize(*args, loop=loop)


def dequantize_into(*args):
    loop = cpu_loop()
    return _triton(ops.DEQUANTIZE_INTO, args) if loop == "triton" else \
        ops.reference_dequantize_into(*args, loop=loop)


def linear(*args):
    loop = cpu_loop()
    return _triton(ops.LINEAR, args) if loop == "triton" else ops.reference_linear(*args, loop=loop)


def grad_input(*args):
    loop = cpu_loop()
    return _triton(ops.GRAD_INPUT, args) if loop == "triton" else ops.reference_grad_input(*args, loop=loop)


KERNELS = {"loralab::dequantize_4bit": dequantize, "loralab::dequantize_4bit_into": dequantize_into,
           "loralab::linear_4bit": linear, "loralab::linear_4bit_grad_input": grad_input}

for _name, _fn in KERNELS.items():
    torch.library.register_kernel(_name, "cpu", _fn)
ops.EAGER_CPU.update({"dequantize_4bit": dequantize, "dequantize_4bit_into": dequantize_into})
