"""Triton kernels for CUDA over the `quant/` 4-bit format (NF4, FP4, INT4).

Importing this package registers the kernels as the "cuda" kernels of the `loralab`
4-bit ops declared in quant/ops.py (loralab_kernels/dispatch.py): `quant.Linear4bit`,
`quant.linear_4bit` and `QLoRALinear` on CUDA tensors then run Triton. `quant` itself is
not changed; `quant.force_backend(...)` / `LORALAB_BACKEND` force a path.

- `linear_4bit(x, packed, state, bias, backend=None)`: the differentiable layer call.
- `dequantize_4bit(packed, state, dtype)`: codes -> dense weight in one pass (launcher).
- `matmul_4bit(x, packed, state, bias)`: `x @ W.T + bias` without materializing W
  (GEMV/split-K for M <= 16, tiled GEMM above); the no-grad launcher.
- `matmul_4bit_grad_input(grad_y, packed, state)`: `grad_y @ W` (launcher).
- `candidate_configs(kind)`, `pin_config(kind, TileConfig(...))`: the tiles the tuner tries,
  and a context manager that fixes one (tests, reproducible benchmarks).
- `loralab_kernels.segmented`: LoRA shrink/expand over many adapters in one launch (segmented and
  gather variants, Punica's SGMV/BGMV), used by `lora.mixed_batch` on CUDA.
- `python -m loralab_kernels.compile_check`: compile every kernel for sm_90 without a GPU.
- Deprecated aliases (warn): `dequantize_nf4`, `nf4_matmul`, `nf4_matmul_grad_input`, `nf4_linear`.

Importing this package never needs Triton; the kernel functions do.
"""
from __future__ import annotations

import functools
import warnings

from . import dispatch as _dispatch
from ._backend import BACKENDS, ENV_VAR, interpreter_enabled, select_backend, triton_available
from .linear import linear_4bit
from .tuning import TileConfig, candidate_configs, pin_config

_dispatch.register()


def dequantize_4bit(packed, state, dtype=None):
    """See `loralab_kernels.dequant.dequantize_4bit`."""
    from .dequant import dequantize_4bit as impl

    return impl(packed, state, dtype)


def matmul_4bit(x, packed, state, bias=None):
    """See `loralab_kernels.matmul.matmul_4bit` (no autograd: use `linear_4bit`)."""
    from .matmul import matmul_4bit as impl

    return impl(x, packed, state, bias)


def matmul_4bit_grad_input(grad_y, packed, state):
    """See `loralab_kernels.grad.matmul_4bit_grad_input`."""
    from .grad import matmul_4bit_grad_input as impl

    return impl(grad_y, packed, state)


def _deprecated(old: str, new):
    @functools.wraps(new)
    def alias(*args, **kwargs):
        warnings.warn(f"loralab_kernels.{old} is deprecated; use loralab_kernels.{new.__name__} (it serves NF4, "
                      f"FP4 and INT4)", DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    return alias


dequantize_nf4 = _deprecated("dequantize_nf4", dequantize_4bit)
nf4_matmul = _deprecated("nf4_matmul", matmul_4bit)
nf4_matmul_grad_input = _deprecated("nf4_matmul_grad_input", matmul_4bit_grad_input)
nf4_linear = _deprecated("nf4_linear", linear_4bit)

__all__ = ["BACKENDS", "ENV_VAR", "TileConfig", "candidate_configs", "dequantize_4bit",
           "dequantize_nf4", "interpreter_enabled", "linear_4bit", "matmul_4bit",
           "matmul_4bit_grad_input", "nf4_linear", "nf4_matmul", "nf4_matmul_grad_input",
           "pin_config", "select_backend", "triton_available"]
