"""Whether Triton can run here, and whether it would for an input (`select_backend`).

The backend in force is `quant.requested_backend()` (`quant.force_backend`, or
`LORALAB_BACKEND`; quant/backend.py). Forcing `triton` on CPU tensors works only under
Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests run the kernels
without a GPU.
"""
from __future__ import annotations

import functools
import os

import torch

from quant.backend import BACKENDS, ENV_VAR, check_backend, requested_backend  # noqa: F401


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing driver libraries)
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when the Triton kernels can run here: Triton imports and there is a CUDA
    device, or the interpreter is on. Never raises."""
    try:
        return _triton_importable() and (torch.cuda.is_available() or interpreter_enabled())
    except Exception:
        return False


def select_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """`"triton"` or `"torch"`: whether the Triton kernels would run for an input `x`.

    Args:
        x: the activation that the layer receives.
        backend: `None` (the backend in force, `quant.requested_backend()`) or one of
            `quant.BACKENDS`.
    """
    mode = requested_backend() if backend is None else check_backend(backend)
    if mode == "triton":
        if not _triton_importable():
            raise RuntimeError("the Triton backend was requested but triton does not import")
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 "
                               f"for CPU tensors; got a tensor on {x.device}")
        return "triton"
    return "triton" if (mode == "auto" and x.is_cuda and _triton_importable()) else "torch"
