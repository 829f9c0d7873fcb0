"""The Triton kernels as the "cuda" kernels of the `loralab` 4-bit ops (quant/ops.py).

Registered at `import loralab_kernels` with `torch.library.register_kernel`: after that, every
`quant.Linear4bit` (so every `QLoRALinear`) and `quant.dequantize_4bit` call on CUDA
tensors reaches Triton through the dispatcher; nothing in `quant` is patched. Under the
Triton interpreter (`TRITON_INTERPRET=1`, the CPU test runs) quant's CPU kernels hand a
call forced to "triton" to these kernels (quant/cpu_backend.py), so the kernels run on
CPU tensors.

Why `torch.library.register_kernel` and not `torch.library.triton_op`: the launchers choose a kernel
(GEMV or GEMM), a grid and a tile (`pick_config` times the candidates on first use) in
Python, which triton_op would have to trace through; as an opaque kernel, `torch.compile`
still traces the op through its fake kernel with no graph break.

Choice per call (`quant.requested_backend()`): "auto" takes Triton when Triton imports and
the kernels take the layer (`supports`), else the PyTorch reference; "triton" insists
(the launcher's error says what it cannot take); "torch" takes the reference;
"native"/"portable" are CPU loops and raise on CUDA tensors.
"""
from __future__ import annotations

import torch

from quant import ops
from quant.backend import requested_backend

from ._backend import _triton_importable

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # activation dtypes every kernel takes


def supports(x: torch.Tensor, shape: list[int], blocksize: int, bias: torch.Tensor | None) -> bool:
    """Whether the kernels take this layer as it is (`auto` uses PyTorch otherwise)."""
    return (x.dtype in ACT_DTYPES and len(shape) == 2 and shape[1] % blocksize == 0
            and x.stride(-1) == 1 and (bias is None or bias.dtype == x.dtype))


def _backend_here(t: torch.Tensor) -> str:
    """The backend in force, refusing the ones that cannot run on these tensors."""
    backend = requested_backend()
    if backend == "triton" and not _triton_importable():
        raise RuntimeError("the Triton backend was requested but triton does not import")
    if backend in ("native", "portable") and t.device.type != "cpu":
        raise RuntimeError(f"impl='native' (or force_backend({backend!r})) is a CPU loop and needs "
                           f"CPU tensors; got tensors on {t.device}")
    return backend


def _use_triton(x: torch.Tensor, shape, blocksize, bias=None) -> bool:
    backend = _backend_here(x)
    return backend == "triton" or (backend == "auto" and x.device.type == "cuda"
                                   and _triton_importable() and supports(x, shape, blocksize, bias))


def _forced_triton(t: torch.Tensor) -> bool:
    return _backend_here(t) == "triton"


def _kernels() -> dict:
    """name -> the "cuda" kernel: Triton when `_use_triton`, else the PyTorch reference."""
    dequantize_ref, into_ref = ops.reference_dequantize, ops.reference_dequantize_into
    linear_ref, grad_ref = ops.reference_linear, ops.reference_grad_input

    # Dequantize runs Triton only when forced: on "auto" CUDA tensors keep the reference's
    # exact bits (the Triton kernel may round bf16 one ulp apart), as before the ops existed.
    def dequantize(packed, *args):
        *state, dtype = args
        if not _forced_triton(packed):
            return dequantize_ref(packed, *args)
        from .dequant import dequantize_4bit
        return dequantize_4bit(packed, ops.rebuild_state(*state), dtype)

    def dequantize_into(packed, *args):
        *state, out = args
        if not _forced_triton(packed):
            return into_ref(packed, *args)
        from .dequant import dequantize_4bit
        out.view(-1).copy_(dequantize_4bit(packed, ops.rebuild_state(*state), out.dtype).view(-1))

    def linear(x, packed, *args):
        *state, bias = args
        if not _use_triton(x, state[-1], state[5], bias):
            return linear_ref(x, packed, *args)
        from .matmul import matmul_4bit
        return matmul_4bit(x, packed, ops.rebuild_state(*state), bias)

    def grad_input(grad_y, packed, *state):
        if not _use_triton(grad_y, state[-1], state[5]):
            return grad_ref(grad_y, packed, *state)
        from .grad import matmul_4bit_grad_input
        return matmul_4bit_grad_input(grad_y.contiguous(), packed, ops.rebuild_state(*state))

    return {"loralab::dequantize_4bit": dequantize, "loralab::dequantize_4bit_into": dequantize_into,
            "loralab::linear_4bit": linear, "loralab::linear_4bit_grad_input": grad_input}


def register() -> None:
    """Register the Triton kernels as the "cuda" kernels of the ops."""
    for name, fn in _kernels().items():
        torch.library.register_kernel(name, "cuda", fn)
