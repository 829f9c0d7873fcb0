"""`nf4_linear`: the one call a 4-bit layer makes, differentiable, with the backend chosen
at run time (Triton on CUDA, the pure-PyTorch reference elsewhere; `LORALAB_KERNELS`
forces either).
"""
from __future__ import annotations

import torch

from quant.state import QuantState

from ._backend import requested_backend, select_backend

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # as in _format (which needs triton)


class NF4LinearFunction(torch.autograd.Function):
    """`y = x @ W.T + b` with a frozen 4-bit W (QLoRA sec. 3: gradients flow through the
    dequantized weight into x, never into W).

    Backward, for y = x W^T + b with x (M, K), W (N, K), b (N,) and upstream g = dL/dy (M, N):
        dL/dx = g W          (M, K): `nf4_matmul_grad_input`, W read in its transposed pattern
        dL/db = sum_m g[m]   (N,)
        dL/dW: none (W is frozen; `packed` holds integer codes).
    """

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        from .matmul import nf4_matmul

        ctx.state = state
        ctx.save_for_backward(packed)
        ctx.has_bias = bias is not None
        return nf4_matmul(x, packed, state, bias)

    @staticmethod
    def backward(ctx, grad_y):
        from .grad import nf4_matmul_grad_input

        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_matmul_grad_input(grad_y.contiguous(), packed, ctx.state)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (M, N) -> (N,)
        return grad_x, None, None, grad_bias


def reference_linear(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The pure-PyTorch path: `quant`'s reference autograd Function, which dequantizes with
    `quant.dequantize_4bit` in forward and again in backward (nothing dense is saved)."""
    from quant.linear import NF4LinearFunction as ReferenceFunction

    return ReferenceFunction.apply(x, packed, state, bias)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
               bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """`x @ dequantize(W).T + bias`, differentiable in x and bias, W frozen.

    Args:
        x: (..., K) activations (float16, bfloat16 or float32).
        packed, state: the 4-bit weight of shape (N, K), from `quant.quantize_4bit`.
        bias: optional (N,) tensor with x's dtype.
        backend: `None` reads `LORALAB_KERNELS` (default `auto`: Triton for CUDA inputs the
            kernels support, e.g. in_features a multiple of the blocksize; PyTorch otherwise);
            `"triton"` or `"torch"` forces a path.

    Returns:
        (..., N) tensor of x's dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a quant.QuantState, got {type(state).__name__}")
    state.validate(packed)  # before `kernels_support` computes with its fields
    mode = select_backend(x, backend)
    auto = (backend or requested_backend()) == "auto"  # not forced by argument or variable
    if mode == "torch" or (auto and not kernels_support(x, state, bias)):
        return reference_linear(x, packed, state, bias)
    return NF4LinearFunction.apply(x, packed, state, bias)


def kernels_support(x: torch.Tensor, state: QuantState, bias: torch.Tensor | None) -> bool:
    """Whether the kernels take this layer as it is; `auto` falls back to PyTorch otherwise
    (a forced `triton` backend raises the launcher's error instead)."""
    return (x.dtype in ACT_DTYPES and len(state.shape) == 2
            and int(state.shape[-1]) % state.blocksize == 0 and x.stride(-1) == 1
            and (bias is None or bias.dtype == x.dtype))
