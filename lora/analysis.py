"""Looking inside learned adapters: subspace similarity and rank (LoRA paper sec. 7).

    from lora.analysis import compare_adapters, energy_captured, subspace_similarity
    grids = compare_adapters("adapter_r8", "adapter_r64", max_i=8, max_j=64)  # {layer: (8, 64)}
    energy_captured(B @ A, k=4)   # share of ||B A||_F^2 a rank-4 truncation keeps

Subspace similarity (LoRA sec. 7.2, eq. 4): for two adapters' A matrices with right-singular
vectors U1 (in, r1) and U2 (in, r2),

    phi(A1, A2, i, j) = || U1[:, :i]^T U2[:, :j] ||_F^2 / min(i, j)   in [0, 1],

the share of the smaller of the two subspaces (top-i directions of A1, top-j of A2) that
lies in the other: 1 when one contains the other, 0 when they are orthogonal.

Truncation (Eckart-Young): the best rank-k approximation of M keeps the top k singular
values, and keeps the share sum_{l<=k} s_l^2 / sum_l s_l^2 of ||M||_F^2.

Adapters can be given as a model with LoRA layers, a saved adapter folder, or a dict
{layer name: (A, B)}; all three give {layer name: (A (r, in), B (out, r))}.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

__all__ = ["adapter_matrices", "compare_adapters", "effective_rank", "energy_captured",
           "energy_spectrum", "subspace_similarity", "subspace_similarity_grid",
           "truncate", "truncation_error"]


def _matrix(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without data); load real weights first")
    if x.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite entries (inf or nan)")
    return x.detach().to(torch.float64)


def _count(k, name: str, upper: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= upper:
        raise ValueError(f"{name} must be in 1..{upper} ({what}), got {k}")
    return k


def right_singular_vectors(A: torch.Tensor, name: str = "A") -> torch.Tensor:
    """Right-singular vectors of A (r, in) as columns, (in, r'), r' = min(r, in), by
    decreasing singular value: the U_A of LoRA sec. 7.2."""
    A = _matrix(A, name)
    if not A.any():
        # The SVD of a zero matrix returns arbitrary directions: phi would be noise.
        raise ValueError(f"{name} is all zeros: it spans no subspace to compare")
    _, _, Vh = torch.linalg.svd(A, full_matrices=False)  # Vh: (r', in)
    return Vh.T  # (in, r')


def _check_pair(A1: torch.Tensor, A2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U1, U2 = right_singular_vectors(A1, "A1"), right_singular_vectors(A2, "A2")
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"A1 and A2 must have the same number of columns (in_features), "
                         f"got A1 {tuple(A1.shape)} and A2 {tuple(A2.shape)}")
    return U1, U2


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """phi(A1, A2, i, j) of LoRA sec. 7.2, eq. 4.

    Args:
        A1: (r1, in) the A matrix (lora_A weight) of one adapter.
        A2: (r2, in) the A matrix of another adapter of the same layer.
        i: top-i right-singular directions of A1, 1 <= i <= min(r1, in).
        j: top-j right-singular directions of A2, 1 <= j <= min(r2, in).

    Returns:
        ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), a float in [0, 1].
    """
    U1, U2 = _check_pair(A1, A2)
    i = _count(i, "i", U1.shape[1], "min(rows, columns) of A1")
    j = _count(j, "j", U2.shape[1], "min(rows, columns) of A2")
    overlap = U1[:, :i].T @ U2[:, :j]  # (i, j)
    return float(overlap.pow(2).sum() / min(i, j))


def subspace_similarity_grid(A1: torch.Tensor, A2: torch.Tensor, max_i: int | None = None,
                             max_j: int | None = None) -> torch.Tensor:
    """phi(A1, A2, i, j) for every i <= max_i, j <= max_j (LoRA figure 3), one SVD each.

    Returns:
        (max_i, max_j) float64 tensor; entry [i-1, j-1] is phi(A1, A2, i, j).
    """
    U1, U2 = _check_pair(A1, A2)
    max_i = U1.shape[1] if max_i is None else _count(max_i, "max_i", U1.shape[1], "min(rows, columns) of A1")
    max_j = U2.shape[1] if max_j is None else _count(max_j, "max_j", U2.shape[1], "min(rows, columns) of A2")
    sq = (U1[:, :max_i].T @ U2[:, :max_j]).pow(2)  # (max_i, max_j)
    cum = sq.cumsum(0).cumsum(1)  # [i-1, j-1] = ||U1[:, :i]^T U2[:, :j]||_F^2
    ii = torch.arange(1, max_i + 1, dtype=torch.float64)[:, None]  # (max_i, 1)
    jj = torch.arange(1, max_j + 1, dtype=torch.float64)[None, :]  # (1, max_j)
    return cum / torch.minimum(ii, jj)


def energy_spectrum(M: torch.Tensor) -> torch.Tensor:
    """Cumulative share of ||M||_F^2 kept by the top-k singular values, k = 1..rank bound.

    Returns:
        (min(M.shape),) float64 tensor, non-decreasing, last entry 1 (all zeros if M = 0).
    """
    M = _matrix(M, "M")
    s2 = torch.linalg.svdvals(M).pow(2)
    total = s2.sum()
    if total == 0:
        return torch.zeros_like(s2)
    return (s2.cumsum(0) / total).clamp(max=1.0)


def energy_captured(M: torch.Tensor, k: int) -> float:
    """Share of ||M||_F^2 kept by the best rank-k approximation of M (Eckart-Young).

    Args:
        M: (out, in) matrix, for an adapter its update B @ A.
        k: the rank kept, 1 <= k <= min(out, in).
    """
    spec = energy_spectrum(M)
    return float(spec[_count(k, "k", spec.numel(), "min(M.shape)") - 1])


def truncation_error(M: torch.Tensor, k: int) -> float:
    """Relative Frobenius error ||M - M_k||_F / ||M||_F of the best rank-k approximation."""
    return max(0.0, 1.0 - energy_captured(M, k)) ** 0.5


def effective_rank(M: torch.Tensor, energy: float = 0.9) -> int:
    """Smallest k whose rank-k truncation keeps at least `energy` of ||M||_F^2 (0 for M = 0).

    Args:
        M: (out, in) matrix.
        energy: the share to keep, 0 < energy <= 1.
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"energy must be a number in (0, 1], got {energy!r}")
    spec = energy_spectrum(M)
    if spec[-1] == 0:
        return 0
    return int((spec < energy - 1e-12).sum()) + 1


def truncate(A: torch.Tensor, B: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors of B @ A, padded to A's and B's shapes so they load in place.

    Args:
        A: (r, in) lora_A weight.  B: (out, r) lora_B weight.  k: 1 <= k <= r.

    Returns:
        (A_k (r, in), B_k (out, r)) in A's and B's dtypes, rows/columns k.. zero, with
        B_k @ A_k the best rank-k approximation of B @ A.
    """
    A64, B64 = _matrix(A, "A"), _matrix(B, "B")
    if B64.shape[1] != A64.shape[0]:
        raise ValueError(f"B's columns must equal A's rows (the rank r), got A {tuple(A.shape)}, B {tuple(B.shape)}")
    r = A64.shape[0]
    k = _count(k, "k", r, "the adapter's rank r")
    U, S, Vh = torch.linalg.svd(B64 @ A64, full_matrices=False)  # (out, m), (m,), (m, in)
    k = min(k, S.numel())
    A_k = torch.zeros_like(A64)
    B_k = torch.zeros_like(B64)
    A_k[:k] = S[:k, None] * Vh[:k]  # (k, in)
    B_k[:, :k] = U[:, :k]  # (out, k)
    return A_k.to(A.dtype), B_k.to(B.dtype)


def adapter_matrices(source, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (A (r, in), B (out, r))} of an adapter.

    Args:
        source: an `nn.Module` holding LoRA layers, a saved adapter folder (PEFT layout),
            or a dict {layer name: (A, B)} (returned as is after checks).
        adapter_name: which adapter of a module's LoRA layers.
    """
    from .config import check_adapter_name

    check_adapter_name(adapter_name)
    if isinstance(source, dict):
        out = {}
        for name, pair in source.items():
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"source[{name!r}] must be a pair (A, B), got {type(pair).__name__}")
            out[name] = (pair[0], pair[1])
        return out
    if isinstance(source, (str, os.PathLike)):
        return _from_folder(Path(source))
    if isinstance(source, nn.Module):
        return _from_module(source, adapter_name)
    raise TypeError(f"source must be an nn.Module, an adapter folder path or a dict, got {type(source).__name__}")


def _from_module(model: nn.Module, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from .inject import lora_layers

    out = {}
    for name, layer in lora_layers(model):
        if adapter_name in getattr(layer, "lora_A", {}):
            A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            A = A.weight if hasattr(A, "weight") else A
            B = B.weight if hasattr(B, "weight") else B
            out[name] = (A.detach(), B.detach())
    if not out:
        raise ValueError(f"source has no LoRA layers with adapter_name {adapter_name!r}")
    return out


def _natural_key(path: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path)]


def _from_folder(directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from .files import read_adapter

    _, tensors = read_adapter(directory)
    out = {}
    # The file's key order is the writer's (safetensors orders by dtype and offset), not the
    # model's: sort by path with numbers compared as numbers, so "layers.2" comes before "layers.10".
    for key, A in sorted(tensors.items(), key=lambda item: _natural_key(item[0])):
        if key.endswith(".lora_A.weight"):
            name = key[:-len(".lora_A.weight")]
            B = tensors.get(name + ".lora_B.weight")
            if B is not None:
                out[name] = (A, B)
    if not out:
        raise ValueError(f"source: {directory} holds no lora_A/lora_B pairs")
    return out


def compare_adapters(first, second, max_i: int | None = None, max_j: int | None = None,
                     adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Per-layer subspace similarity grids of two adapters of the same model (LoRA figure 3).

    Args:
        first, second: adapters as accepted by `adapter_matrices`.
        max_i, max_j: grid size, at most each adapter's rank (default: the full rank).

    Returns:
        {layer name: (max_i, max_j) grid} for the layers both adapters adapt, in `first`'s order.
    """
    a, b = adapter_matrices(first, adapter_name), adapter_matrices(second, adapter_name)
    common = [n for n in a if n in b]
    if not common:
        raise ValueError("first and second adapt no layer in common; "
                         f"first has e.g. {list(a)[:3]}, second {list(b)[:3]}")
    return {n: subspace_similarity_grid(a[n][0], b[n][0], max_i, max_j) for n in common}
