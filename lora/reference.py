"""Dense float64 references for LoRA, written the obvious way; tests compare the layers to them.

`W_eff = W + scaling * B @ A` (LoRA sec. 4.1, eq. 3), then an ordinary linear / embedding.
"""
from __future__ import annotations

import torch

# dtype -> (atol, rtol) for comparing a layer's output with the float64 reference.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
}


def lora_linear_ref(x, W, b, A, B, scaling, fan_in_fan_out=False):
    """`x (W + scaling * B A)^T + b` in float64; W is (out, in), or (in, out) with fan_in_fan_out."""
    W = W.double()
    if fan_in_fan_out:
        W = W.T  # (out, in)
    W_eff = W + scaling * (B.double() @ A.double())  # (out, in)
    out = x.double() @ W_eff.T
    return out if b is None else out + b.double()


def lora_embedding_ref(ids, E, A, B, scaling):
    """`(E + scaling * (B A)^T)[ids]` in float64; E (num, dim), A (r, num), B (dim, r)."""
    E_eff = E.double() + scaling * (B.double() @ A.double()).T  # (num, dim)
    return E_eff[ids]


def assert_close(actual, expected, dtype):
    """Compare with the dtype's (atol, rtol); atol is relative to the largest reference value,
    because rounding errors of a dot product grow with the size of its terms."""
    if dtype not in TOL:
        raise ValueError(f"dtype must be one of {list(TOL)}, got {dtype!r}")
    atol, rtol = TOL[dtype]
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), atol=atol * scale, rtol=rtol)
