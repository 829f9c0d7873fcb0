"""Adapter initializations that start from the weight: PiSSA, OLoRA and LoftQ.

Plain LoRA starts with B = 0, so training begins from the (maybe quantized) base. These
schemes move part of W into the adapter instead, so that `base + s * B @ A` is W itself
(PiSSA, OLoRA) or closer to W than the quantized weight alone (LoftQ).

Convention of every function here: it returns `InitResult(base, A, B)` with A `(r, in)`,
B `(out, r)` and

    W ~ base + scaling * B @ A        (scaling = 1 unless given)

`base` is the new frozen weight (for LoftQ and QPiSSA a `(packed, QuantState)` pair of the
4-bit format, holding NF4, NF3 or NF2 levels). A layer
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
LOFTQ_QUANT_TYPES = {4: "nf4", 3: "nf3", 2: "nf2"}  # LoftQ's bits -> NormalFloat base (3 and 2 bits stored in 4)
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
    """2..8 is the range LoftQ is defined for (Li et al. 2023, sec. 4: 2, 4 and 8 bits); 2, 3, 4 are built here."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be an int from 2 to 8, got {bits!r}")
    return bits


def check_loftq_bits_supported(bits, name: str = "bits") -> int:
    """bits with a base format here: 4 (NF4), 3 (NF3), 2 (NF2); NF3 and NF2 are stored in 4 bits."""
    check_loftq_bits(bits, name)
    if bits not in LOFTQ_QUANT_TYPES:
        raise ValueError(f"{name}={bits}: there is no {bits}-bit base format here (PEFT only simulates 8 bits "
                         f"with a dense weight); allowed: {name} in {sorted(LOFTQ_QUANT_TYPES)} "
                         f"(NF2, NF3, NF4)")
    return bits


def check_loftq_iter(iters, name: str = "iters") -> int:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{name} must be an int >= 1, got {iters!r}")
    return iters


def _work_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


# ----- the factorizations -----

def top_r_svd(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r largest singular triplets `U_r (out, r), S_r (r,), Vh_r (r, in)` (exact SVD).

    A wide M is factored as its transpose: the same decomposition, but LAPACK's SVD of a
    (576, 1536) matrix took 3.7x as long as that of its (1536, 576) transpose here."""
    if M.shape[0] < M.shape[1]:
        U, S, Vh = torch.linalg.svd(M.T, full_matrices=False)  # M^T = U S Vh  =>  M = Vh^T S U^T
        return Vh[:r].T, S[:r], U[:, :r].T
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]


# Below this ratio s_r / s_1 the Gram matrix's rounding (u * s_1^2) reaches s_r^2: use the SVD.
GRAM_MIN_RATIO = {torch.float32: 1e-2, torch.float64: 1e-6}


def top_r_svd_gram(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same triplets as `top_r_svd` from the eigenvectors of the small Gram matrix
    `X^T X` (X = M or M^T, whichever is tall): for `(m, n)` with m >= n, one m n^2 matmul and
    an n x n symmetric eigensolver, 2-5x faster than the SVD on these CPUs. Squaring the
    matrix costs accuracy only for singular values far below s_1 (relative error about
    u (s_1 / s_i)^2), so when `s_r / s_1 < GRAM_MIN_RATIO` it returns the exact SVD instead.
    LoftQ's residuals (quantization noise: flat spectra) are always well inside the bound."""
    tall = M.shape[0] >= M.shape[1]
    X = M if tall else M.T  # (m, n), m >= n
    evals, V = torch.linalg.eigh(X.T @ X)  # ascending; (n,), (n, n)
    S = evals[-r:].flip(0).clamp(min=0).sqrt()  # (r,) descending
    if not bool(S[-1] > GRAM_MIN_RATIO.get(M.dtype, 1e-2) * S[0]):
        return top_r_svd(M, r)
    V = V[:, -r:].flip(1)  # (n, r)
    U = (X @ V) / S  # (m, r): X v_i = s_i u_i
    return (U, S, V.T) if tall else (V, S, U.T)


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

        Q_t = q_N(W - s * B_{t-1} A_{t-1})          (eq. 5, NF`bits` blockwise, as QLoRA)
        B_t, A_t = SVD_r(W - dequant(Q_t))          (eq. 6, split as two square roots)

    as `InitResult((packed, state), A_t, B_t)`. `bits` 4, 3 or 2: NF4, NF3 or NF2 levels
    (`quant.normal_float_code(bits)`), each stored in the 4-bit format."""
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
        packed, state = quantize_4bit(residual.contiguous(), LOFTQ_QUANT_TYPES[bits], blocksize, double_quant)
        error = M - dequantize_4bit(packed, state, dtype=torch.float32).to(work)  # (out, in)
        A, B = _split_sqrt(*top_r_svd_gram(error, r), scaling, dtype or work)
        yield InitResult((packed, state), A, B)
        residual = _residual(M, A, B, scaling).to(torch.float32)


def loftq(W: torch.Tensor, bits: int = 4, r: int = 16, iters: int = 1, **kwargs) -> InitResult:
    """LoftQ (Li et al. 2023, Algorithm 1) after `iters` alternating steps: the NF`bits` base Q
    and the factors with `W ~ dequant(Q) + scaling * B @ A`; keyword arguments as `loftq_iterates`."""
    result = None
    for result in loftq_iterates(W, bits, r, iters, **kwargs):  # noqa: B007  (only the last step is kept)
        pass
    return result


def qpissa(W: torch.Tensor, bits: int = 4, r: int = 16, niter: int | None = None, *, scaling: float = 1.0,
           dtype: torch.dtype | None = None, blocksize: int = 64, double_quant: bool = True,
           generator: torch.Generator | None = None) -> InitResult:
    """QPiSSA (Meng et al. 2024, sec. 4): PiSSA's factors from the full-precision W, and the
    residual `W - s * B @ A` quantized as the frozen base (NF`bits`, stored in 4 bits).

    The principal part is left out of the quantized matrix, so the base has a smaller range
    to cover than W itself: compare LoftQ, which starts from `quant(W)` instead. Equals the
    first half-step of LoftQ started from the SVD side. Returns `InitResult((packed, state), A, B)`."""
    check_loftq_bits_supported(bits)
    residual, A, B = pissa(W, r, niter, scaling=scaling, dtype=dtype, generator=generator)
    base = quantize_4bit(residual.to(torch.float32).contiguous(), LOFTQ_QUANT_TYPES[bits], blocksize,
                         double_quant)
    return InitResult(base, A, B)


def loftq_error(W: torch.Tensor, result: InitResult, scaling: float = 1.0) -> float:
    """`||W - (dequant(Q) + s * B A)||_F` in float64 (the objective of LoftQ eq. 4)."""
    packed, state = result.base
    approx = dequantize_4bit(packed, state, dtype=torch.float32).double() \
        + scaling * (result.B.double() @ result.A.double())
    return float(torch.linalg.matrix_norm(W.double() - approx))


def loftq_on_quantized(W: torch.Tensor, base: tuple[torch.Tensor, QuantState], r: int = 16, *,
                       scaling: float = 1.0, dtype: torch.dtype | None = None) -> InitResult:
    """LoftQ's SVD half-step (Li et al. 2023, eq. 6) for a base that is already quantized:
    `B, A = SVD_r(W - dequant(Q))` with Q kept as it is. This is what PEFT's
    `replace_lora_weights_loftq` does for a bitsandbytes model (one step: Q cannot change
    without re-quantizing the model). `W` is the full-precision weight Q was made from.
    Returns `InitResult(base, A, B)`; with Q = quant(W) it equals `loftq(W, iters=1)`."""
    _check_weight(W)
    packed, state = base
    if tuple(state.shape) != tuple(W.shape):
        raise ValueError(f"W has shape {tuple(W.shape)} but the quantized base holds {tuple(state.shape)}")
    check_init_rank(r, W.shape)
    scaling = _check_scaling(scaling)
    work = _work_dtype(W)
    M = W.detach().to(work)
    error = M - dequantize_4bit(packed, state, dtype=torch.float32).to(work)  # (out, in)
    A, B = _split_sqrt(*top_r_svd_gram(error, r), scaling, dtype or work)
    return InitResult(base, A, B)


@torch.no_grad()
def init_loftq_on_quantized(model: torch.nn.Module, weights: dict[str, torch.Tensor],
                            adapter_name: str = "default") -> list[str]:
    """Start the adapters of an already-quantized model (QLoRALinear layers, e.g. from
    `quantize_model` + `apply_lora`) with `loftq_on_quantized`, given the original weights.

    Args:
        model: holds `QLoRALinear` modules with adapter `adapter_name`, unmerged.
        weights: module name -> full-precision weight `(out, in)` (e.g. read from the
            model's safetensors file), for every QLoRALinear of the model that has the adapter.
    Returns the names of the layers changed. Every check runs before any layer changes."""
    from quant import Linear4bit

    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of module name -> tensor, got {type(weights).__name__}")
    # QLoRALinear layers, known by their 4-bit base (lora.qlora imports this module, not back)
    layers = {n: m for n, m in model.named_modules()
              if isinstance(getattr(m, "base_layer", None), Linear4bit)
              and isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and adapter_name in m.lora_A}
    if not layers:
        raise ValueError(f"the model has no QLoRALinear with adapter {adapter_name!r}; quantize it and "
                         "apply_lora first (or use init='loftq' on the dense model)")
    missing = sorted(set(layers) - set(weights))
    if missing:
        raise ValueError(f"weights has no full-precision weight for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}: LoftQ needs W for every quantized layer")
    for name, layer in layers.items():
        shape = (layer.out_features, layer.in_features)
        W = weights[name]
        if not isinstance(W, torch.Tensor) or tuple(W.shape) != shape:
            got = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
            raise ValueError(f"weights[{name!r}] must be a tensor of shape {shape}, got {got}")
        _check_weight(W)
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"{name}: adapter {adapter_name!r} is merged; unmerge it first")
    for name, layer in layers.items():
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        base = layer.base_layer
        res = loftq_on_quantized(weights[name].to(base.weight_packed.device), (base.weight_packed, base.quant_state),
                                 A.shape[0], scaling=layer.scaling[adapter_name], dtype=A.dtype)
        A.copy_(res.A)
        B.copy_(res.B)
    return list(layers)
