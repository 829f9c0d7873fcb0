"""Triton kernels for CUDA over the `quant/` 4-bit format.

- `dequantize_nf4(packed, state, dtype)`: codes -> dense weight in one pass.
- `nf4_matmul(x, packed, state, bias)`: `x @ W.T + bias` without materializing W
  (GEMV/split-K for M <= 16, tiled GEMM above).
- `nf4_matmul_grad_input(grad_y, packed, state)`: `grad_y @ W`.
- `nf4_linear(x, packed, state, bias)`: the differentiable layer call; Triton on CUDA,
  pure PyTorch elsewhere, `LORALAB_KERNELS=triton|torch|auto` forces a path.
- `candidate_configs(kind)`, `pin_config(kind, TileConfig(...))`: the tiles the tuner tries,
  and a context manager that fixes one (tests, reproducible benchmarks).
- `python -m kernels.compile_check`: compile every kernel for sm_90 without a GPU.

Importing this package never needs Triton; the kernel functions do.
"""
from __future__ import annotations

import quant.linear as _quant_linear

from ._backend import BACKENDS, ENV_VAR, interpreter_enabled, select_backend, triton_available
from .autograd import NF4LinearFunction, nf4_linear, reference_linear
from .tuning import TileConfig, candidate_configs, pin_config

# Every quant.LinearNF4 (and so every QLoRALinear) calls through `nf4_linear` from now on:
# Triton for CUDA inputs, quant's PyTorch reference otherwise.
_quant_linear.register_fast_linear(nf4_linear)


def dequantize_nf4(packed, state, dtype=None):
    """See `kernels.dequant.dequantize_nf4`."""
    from .dequant import dequantize_nf4 as impl

    return impl(packed, state, dtype)


def nf4_matmul(x, packed, state, bias=None):
    """See `kernels.matmul.nf4_matmul`."""
    from .matmul import nf4_matmul as impl

    return impl(x, packed, state, bias)


def nf4_matmul_grad_input(grad_y, packed, state):
    """See `kernels.grad.nf4_matmul_grad_input`."""
    from .grad import nf4_matmul_grad_input as impl

    return impl(grad_y, packed, state)


__all__ = ["BACKENDS", "ENV_VAR", "NF4LinearFunction", "TileConfig", "candidate_configs",
           "dequantize_nf4", "interpreter_enabled", "nf4_linear", "nf4_matmul",
           "nf4_matmul_grad_input", "pin_config", "reference_linear", "select_backend",
           "triton_available"]
