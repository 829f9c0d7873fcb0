"""`linear_4bit`: the differentiable 4-bit layer call, with an optional per-call backend.

It is `quant.linear_4bit` (one call of the `loralab::linear_4bit` op, whose "cuda" kernel
is Triton once `loralab_kernels` is imported, see loralab_kernels/dispatch.py) inside a
`quant.force_backend(backend)` block when `backend` is given. The autograd formula is the
op's (quant/ops.py): dL/dx = g W through `loralab::linear_4bit_grad_input`, dL/db = sum_m g[m].
"""
from __future__ import annotations

import contextlib

import torch

from quant import force_backend
from quant import linear_4bit as _linear_4bit
from quant.state import QuantState


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """`x @ dequantize(W).T + bias`, differentiable in x and bias, W frozen.

    Args:
        x: (..., K) activations (float16, bfloat16 or float32).
        packed, state: the 4-bit weight of shape (N, K), from `quant.quantize_4bit`.
        bias: optional (N,) tensor with x's dtype.
        backend: None (the backend in force, `quant.requested_backend()`: by default Triton
            for CUDA inputs the kernels take, e.g. in_features a multiple of the blocksize)
            or one of `quant.BACKENDS` for this call ("triton", "torch", ...).

    Returns:
        (..., N) tensor of x's dtype.
    """
    block = contextlib.nullcontext() if backend is None else force_backend(backend)
    with block:
        return _linear_4bit(x, packed, state, bias)
