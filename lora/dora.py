"""DoRA's row norms (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

DoRA splits the adapted weight into a magnitude m (one number per output row) and a
direction: `W' = (m / ||W + s B A||_row) * (W + s B A)` (DoRA eq. 5). The norm of each
row of `W + s B A` is needed at every forward. Forming that (out, in) matrix costs as
much memory as the weight itself; expanding the square avoids it:

    ||W + s B A||_row^2 = ||W||_row^2 + 2 s rowsum((W A^T) * B) + s^2 rowsum((B (A A^T)) * B)

`||W||_row^2` is cached (W is frozen), `W A^T` is (out, r) and `A A^T` is (r, r), so the
extra memory is O((out + in) r) instead of O(out * in). `dense_row_norm` is the
obvious formula, kept as the reference.
"""
from __future__ import annotations

import torch


def _float(t: torch.Tensor) -> torch.Tensor:
    """float32 (float64 stays float64): squares of bf16 rows lose too many digits."""
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def dense_row_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """`||W + scaling * B A||` of each row, forming the full matrix (the reference; PEFT's way).

    Args:
        W: (out, in) base weight. A: (r, in). B: (out, r).

    Returns:
        (out,) row norms in float32 (float64 for float64 inputs).
    """
    W = _float(W)
    return torch.linalg.vector_norm(W + scaling * (B.to(W.dtype) @ A.to(W.dtype)), dim=1)  # (out,)


def weight_row_sq_norm(W: torch.Tensor) -> torch.Tensor:
    """`||W||_row^2`, shape (out,), in float32 (float64 for float64 W); the part worth caching."""
    W = _float(W)
    return (W * W).sum(dim=1)


def factored_row_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                      w_sq: torch.Tensor | None = None) -> torch.Tensor:
    """`||W + scaling * B A||` of each row without forming the (out, in) matrix.

    Args:
        W: (out, in) base weight. A: (r, in). B: (out, r).
        scaling: s in `W + s B A`.
        w_sq: cached `weight_row_sq_norm(W)`; computed when None.

    Returns:
        (out,) row norms, float32 (float64 for float64 inputs). Rounding can make the
        expanded square slightly negative when the row almost cancels; it is clamped at 0.
    """
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    A, B = A.to(dt), B.to(dt)
    if w_sq is None:
        w_sq = weight_row_sq_norm(W)
    WAt = W @ A.T.to(W.dtype) if W.dtype == dt else _float(W) @ A.T  # (out, r)
    cross = (WAt.to(dt) * B).sum(dim=1)  # (out,)  = rowsum((W A^T) * B)
    quad = ((B @ (A @ A.T)) * B).sum(dim=1)  # (out,)  = rowsum((B A A^T) * B)
    sq = w_sq.to(dt) + 2.0 * scaling * cross + (scaling * scaling) * quad
    return sq.clamp_min(0.0).sqrt()


def dora_linear_ref(x, W, b, A, B, m, scaling):
    """DoRA eq. 5 written the obvious way, float64: `x ((m / ||V||_row) * V)^T + b` with
    `V = W + scaling * B A` (out, in) and the norm detached (DoRA sec. 4.3)."""
    V = W.double() + scaling * (B.double() @ A.double())  # (out, in)
    norm = torch.linalg.vector_norm(V, dim=1).detach()  # (out,)
    out = x.double() @ ((m.double() / norm)[:, None] * V).T
    return out if b is None else out + b.double()
