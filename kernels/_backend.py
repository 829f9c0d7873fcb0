"""Which path runs a 4-bit layer: the Triton kernels or the pure-PyTorch reference.

`auto` (the default) uses Triton when the input is on CUDA and Triton imports; the
environment variable `LORALAB_KERNELS` forces either path (`triton` or `torch`).
Forcing `triton` on CPU tensors works only under Triton's interpreter
(`TRITON_INTERPRET=1`), which is how the tests run the kernels without a GPU.
"""
from __future__ import annotations

import functools
import os

import torch

ENV_VAR = "LORALAB_KERNELS"
BACKENDS = ("auto", "triton", "torch")


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


def requested_backend() -> str:
    """The backend asked for by `LORALAB_KERNELS` (`auto` when unset)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={mode!r} is not one of {BACKENDS}")
    return mode


def select_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """`"triton"` or `"torch"` for an input `x`.

    Args:
        x: the activation that the layer receives.
        backend: `None` (read `LORALAB_KERNELS`), `"auto"`, `"triton"` or `"torch"`.
    """
    mode = requested_backend() if backend is None else backend
    if mode not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {mode!r}")
    if mode == "torch":
        return "torch"
    if mode == "triton":
        if not _triton_importable():
            raise RuntimeError("the Triton backend was requested but triton does not import")
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 "
                               f"for CPU tensors; got a tensor on {x.device}")
        return "triton"
    return "triton" if (x.is_cuda and _triton_importable()) else "torch"
