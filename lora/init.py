"""Adapter initializations that start from the weight: PiSSA, OLoRA and LoftQ.

Plain LoRA starts with B = 0, so training begins from the (maybe quantized) base. These
schemes move part of W into the adapter instead, so that `base + s * B @ A` is W itself
(PiSSA, OLoRA) or closer to W than the quantized weight alone (LoftQ).

Convention of every function here: it returns `InitResult(base, A, B)` with A `(r, in)`,
B `(out, r)` and

    W ~ base + scaling * B @ A        (scaling = 1 unless given)

`base` is the new frozen weight (for LoftQ a `(packed, QuantState)` 4-bit pair). A layer
passes its own `scaling` (alpha / r), and the factors are divided by it as PEFT does
(PiSSA, LoftQ: `S / scaling` split as two square roots; OLoRA: PEFT keeps `Q_r, R_r` and
subtracts `scaling * Q_r R_r` from the base). The factors are rounded to `dtype` *before*
the base is formed from them, so `base + scaling * B @ A` equals W up to the rounding of
that subtraction (float32), whatever the adapter dtype.

Computation is float32 (float64 for a float64 W); the tests compare with float64
references written with `torch.linalg.svd` / `torch.linalg.qr`.
"""
from __future__ import annotations

import re
from typing import Iterator, NamedTuple

import torch

from quant import QuantState, dequantize_4bit, quantize_4bit

REWRITING_INITS = ("pissa", "olora", "loftq")  # inits that change the frozen base (PEFT's names)
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")  # PEFT's "pissa_niter_K": randomized SVD with K power iterations
LOFTQ_BITS_STORED = (4,)  # bits with a real storage format here (NF4)
RSVD_OVERSAMPLE = 10  # Halko et al. 2011 sec. 4.2: p = 5..10 extra columns make the range finder reliable


class InitResult(NamedTuple):
    base: torch.Tensor | tuple[torch.Tensor, QuantState]  # the new frozen weight (out, in), or 4-bit (packed, state)
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)


def init_kind(init: str) -> str:
    """"pissa" for "pissa" and "pissa_niter_K", else `init` itself."""
    return "pissa" if isinstance(init, str) and PISSA_NITER.fullmatch(init) else init


def pissa_niter(init: str) -> int | None:
    """K of "pissa_niter_K" (randomized SVD), None for exact "pissa"."""
    match = PISSA_NITER.fullmatch(init)
    return int(match.group(1)) if match else None


# ----- argument checks -----

def _check_weight(W) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2 or not W.is_floating_point() or W.numel() == 0:
        raise ValueError(f"W must be a non-empty 2-D float tensor (out, in), got {W.dtype} {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError("W holds inf or nan; an initialization from it would be meaningless")


def check_init_rank(r, shape, name: str = "r") -> int:
    """r must be a positive int no larger than min(out, in): a rank-r factor of W needs r <= rank(W)'s bound."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{name} must be a positive int, got {r!r}")
    if r > min(shape):
        raise ValueError(f"{name}={r} is larger than min(out, in) = {min(shape)} of a {tuple(shape)} weight; "
                         "a rank-r factorization of it needs r <= min(out, in)")
    return r


def _check_scaling(scaling) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not scaling > 0 \
            or scaling == float("inf"):
        raise ValueError(f"scaling must be a finite number > 0, got {scaling!r}")
    return float(scaling)


def check_loftq_bits(bits, name: str = "bits") -> int:
    """2..8 is the range LoftQ is defined for (Li et al. 2023, sec. 4: 2, 4 and 8 bits); only NF4 is stored here."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be an int from 2 to 8, got {bits!r}")
    return bits


def check_loftq_bits_supported(bits, name: str = "bits") -> int:
    check_loftq_bits(bits, name)
    if bits in (2, 3):
        raise ValueError(f"{name}={bits}: NF3/NF2 bases are not supported yet; only {name}=4 (NF4) is")
    if bits not in LOFTQ_BITS_STORED:
        raise ValueError(f"{name}={bits}: there is no {bits}-bit storage format here (PEFT only simulates 8 bits "
                         f"with a dense weight); use {name}=4 (NF4)")
    return bits


def check_loftq_iter(iters, name: str = "iters") -> int:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{name} must be an int >= 1, got {iters!r}")
    return iters


def _work_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


# ----- the factorizations -----

def top_r_svd(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r largest singular triplets `U_r (out, r), S_r (r,), Vh_r (r, in)` (exact SVD)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]


def randomized_svd(M: torch.Tensor, r: int, niter: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-r SVD by randomized subspace iteration (Halko, Martinsson & Tropp 2011,
    Algorithm 4.4; PiSSA sec. 4 "fast SVD"): a Gaussian sketch of `r + 10` columns, `niter`
    power iterations re-orthonormalized by QR, then an exact SVD of the small projection.
    Deterministic for a given `generator` (or under `torch.manual_seed`)."""
    q = min(r + RSVD_OVERSAMPLE, *M.shape)
    omega = torch.randn(M.shape[1], q, generator=generator, dtype=M.dtype, device=M.device)  # (in, q)
    Q, _ = torch.linalg.qr(M @ omega)  # (out, q): basis of the sampled range
    for _ in range(niter):
        Z, _ = torch.linalg.qr(M.T @ Q)  # (in, q)
        Q, _ = torch.linalg.qr(M @ Z)  # (out, q)
    U_small, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)  # (q, q), (q,), (q, in)
    return (Q @ U_small)[:, :r], S[:r], Vh[:r]


def _split_sqrt(U, S, Vh, scaling: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A = sqrt(S / s) Vh, B = U sqrt(S / s), so s * B @ A = U S Vh (LoftQ eq. 6, PiSSA eq. 2-3)."""
    root = torch.sqrt(S / scaling)  # (r,)
    A = root[:, None] * Vh  # (r, in)
    B = U * root[None, :]  # (out, r)
    return A.to(dtype), B.to(dtype)


def _residual(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W - scaling * B @ A in the working dtype, from the factors as they are stored."""
    work = _work_dtype(W)
    return W.to(work) - scaling * (B.to(work) @ A.to(work))


def pissa(W: torch.Tensor, r: int = 16, niter: int | None = None, *, scaling: float = 1.0,
          dtype: torch.dtype | None = None, generator: torch.Generator | None = None) -> InitResult:
    """PiSSA (Meng et al. 2024, sec. 3, eq. 2-4): the principal singular part of W becomes the adapter.

    `W = U S V^T`; A = sqrt(S_r) V_r^T, B = U_r sqrt(S_r) (each divided by sqrt(scaling));
    the frozen base is the residual `W_res = W - scaling * B @ A` (eq. 4). `niter=None`:
    exact SVD; an int K: randomized SVD with K power iterations (PEFT's "pissa_niter_K").

    Returns `InitResult(base (out, in) in W's dtype, A (r, in), B (out, r))` in `dtype`
    (default: float32, float64 for a float64 W)."""
    _check_weight(W)
    check_init_rank(r, W.shape)
    scaling = _check_scaling(scaling)
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be None (exact SVD) or an int >= 0, got {niter!r}")
    work = _work_dtype(W)
    M = W.detach().to(work)
    U, S, Vh = top_r_svd(M, r) if niter is None else randomized_svd(M, r, niter, generator)
    A, B = _split_sqrt(U, S, Vh, scaling, dtype or work)
    return InitResult(_residual(M, A, B, scaling).to(W.dtype), A, B)


def olora(W: torch.Tensor, r: int = 16, *, scaling: float = 1.0, dtype: torch.dtype | None = None) -> InitResult:
    """OLoRA (Büyükakyüz 2024, sec. 3, Algorithm 1): `W = Q R` (thin QR); B = Q_r (orthonormal
    columns), A = R_r (the first r rows of R), and the base `W - scaling * Q_r R_r`.

    As in PEFT's `olora_init` the factors are not divided by `scaling`: with scaling s the
    adapter holds `s * Q_r R_r` and the base the rest. Returns `InitResult(base, A, B)`."""
    _check_weight(W)
    check_init_rank(r, W.shape)
    scaling = _check_scaling(scaling)
    work = _work_dtype(W)
    M = W.detach().to(work)
    Q, R = torch.linalg.qr(M)  # (out, k), (k, in), k = min(out, in)
    A, B = R[:r].to(dtype or work), Q[:, :r].to(dtype or work)
    return InitResult(_residual(M, A, B, scaling).to(W.dtype), A, B)


def loftq_iterates(W: torch.Tensor, bits: int = 4, r: int = 16, iters: int = 1, *, scaling: float = 1.0,
                   dtype: torch.dtype | None = None, blocksize: int = 64,
                   double_quant: bool = True) -> Iterator[InitResult]:
    """Each step of LoftQ (Li et al. 2023, sec. 3, Algorithm 1), for study: starting from
    A = B = 0, step t yields

        Q_t = q_N(W - s * B_{t-1} A_{t-1})          (eq. 5, NF4 blockwise, as QLoRA)
        B_t, A_t = SVD_r(W - dequant(Q_t))          (eq. 6, split as two square roots)

    as `InitResult((packed, state), A_t, B_t)`. Only 4 bits (NF4) are stored here."""
    _check_weight(W)
    check_loftq_bits_supported(bits)
    check_init_rank(r, W.shape)
    check_loftq_iter(iters)
    scaling = _check_scaling(scaling)
    work = _work_dtype(W)
    M = W.detach().to(work)
    target = M.to(torch.float32)  # the 4-bit quantizer takes float32 (out, in)
    residual = target
    for _ in range(iters):
        packed, state = quantize_4bit(residual.contiguous(), "nf4", blocksize, double_quant)
        error = M - dequantize_4bit(packed, state, dtype=torch.float32).to(work)  # (out, in)
        A, B = _split_sqrt(*top_r_svd(error, r), scaling, dtype or work)
        yield InitResult((packed, state), A, B)
        residual = _residual(M, A, B, scaling).to(torch.float32)


def loftq(W: torch.Tensor, bits: int = 4, r: int = 16, iters: int = 1, **kwargs) -> InitResult:
    """LoftQ (Li et al. 2023, Algorithm 1) after `iters` alternating steps: the 4-bit base Q
    and the factors with `W ~ dequant(Q) + scaling * B @ A`; keyword arguments as `loftq_iterates`."""
    result = None
    for result in loftq_iterates(W, bits, r, iters, **kwargs):  # noqa: B007  (only the last step is kept)
        pass
    return result


def loftq_error(W: torch.Tensor, result: InitResult, scaling: float = 1.0) -> float:
    """`||W - (dequant(Q) + s * B A)||_F` in float64 (the objective of LoftQ eq. 4)."""
    packed, state = result.base
    approx = dequantize_4bit(packed, state, dtype=torch.float32).double() \
        + scaling * (result.B.double() @ result.A.double())
    return float(torch.linalg.matrix_norm(W.double() - approx))
