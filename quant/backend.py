"""The one override of which kernel runs the 4-bit ops (for tests and benchmarks).

By default ("auto") the dispatcher picks the kernel from the inputs' device: the C loop of
`quant.native` for CPU tensors (when it builds), the Triton kernels of `loralab_kernels/` for CUDA
tensors (once `loralab_kernels` is imported; `lora` imports it), and the plain PyTorch reference
otherwise. To force a path:

    with quant.force_backend("torch"):      # or "native", "portable", "triton"
        y = layer(x)

or set `LORALAB_BACKEND=torch|native|portable|triton|auto` for the whole process (the
context manager wins). Backends:

- "auto": as above.
- "torch": the plain PyTorch reference on every device.
- "native": the C loop (CPU tensors; an error when it is not built).
- "portable": the C loop without AVX-512 (CPU tensors; what an AVX2-only machine runs).
- "triton": the Triton kernels (CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1`
  with `loralab_kernels` imported); an error where they cannot run.

Deprecated aliases, still honoured: `LORALAB_KERNELS=auto|torch|triton` (read when
`LORALAB_BACKEND` is unset) and `dequantize_4bit(..., impl=...)`. `LORALAB_NATIVE=0|1|portable`
is a separate switch: whether the C loop may be built and loaded at all (see quant/native.py).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

BACKENDS = ("auto", "torch", "native", "portable", "triton")
ENV_VAR = "LORALAB_BACKEND"
LEGACY_ENV_VAR = "LORALAB_KERNELS"  # deprecated: auto|triton|torch
_LEGACY_BACKENDS = ("auto", "triton", "torch")

# None: not forced by a `force_backend` block (then the environment decides).
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("loralab_backend", default=None)


def check_backend(name: str, what: str = "backend") -> str:
    """`name` if it is one of `BACKENDS`, else ValueError naming `what`."""
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run the 4-bit ops inside the block on backend `name` (one of `BACKENDS`)."""
    token = _forced.set(check_backend(name))
    try:
        yield
    finally:
        _forced.reset(token)


def requested_backend() -> str:
    """The backend in force: a `force_backend` block, else $LORALAB_BACKEND, else the
    deprecated $LORALAB_KERNELS, else "auto"."""
    forced = _forced.get()
    if forced is not None:
        return forced
    value = os.environ.get(ENV_VAR)
    if value is not None and value.strip():
        return check_backend(value.strip().lower(), ENV_VAR)
    legacy = os.environ.get(LEGACY_ENV_VAR, "").strip().lower()
    if legacy:
        if legacy not in _LEGACY_BACKENDS:
            raise ValueError(f"{LEGACY_ENV_VAR}={legacy!r} is not one of {_LEGACY_BACKENDS}")
        return legacy
    return "auto"
