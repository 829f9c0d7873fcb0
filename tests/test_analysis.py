"""lora.analysis against dense references with known answers (LoRA paper sec. 7.2)."""
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from lora import LoRAConfig, apply_lora, save_adapter
from lora.analysis import (
    adapter_matrices,
    compare_adapters,
    effective_rank,
    energy_captured,
    energy_spectrum,
    subspace_similarity,
    subspace_similarity_grid,
    truncate,
    truncation_error,
)


def reference_phi(A1: np.ndarray, A2: np.ndarray, i: int, j: int) -> float:
    """Eq. 4 through principal angles (scipy), independent of the module's SVD path."""
    U1 = np.linalg.svd(A1.astype(np.float64))[2].T[:, :i]  # (in, i)
    U2 = np.linalg.svd(A2.astype(np.float64))[2].T[:, :j]  # (in, j)
    angles = scipy.linalg.subspace_angles(U1, U2)  # min(i, j) principal angles
    return float(np.sum(np.cos(angles) ** 2) / min(i, j))


def with_singular_values(Q: torch.Tensor, s) -> torch.Tensor:
    """A (len(s), in) whose right-singular vectors are the rows of Q, in order of s (decreasing)."""
    return torch.tensor(s, dtype=torch.float64)[:, None] * Q  # (r, in)


def orthonormal_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))  # (d, n)
    return q.T  # (n, d)


@pytest.mark.parametrize("r1, r2, d", [(4, 4, 16), (3, 7, 41), (8, 64, 96), (8, 5, 5)])
def test_same_subspace_gives_one(r1, r2, d):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(r1, d, generator=g, dtype=torch.float64)
    mix = torch.randn(r1, r1, generator=g, dtype=torch.float64)
    # A mixed by an invertible matrix has the same row space: phi at full rank is 1.
    assert subspace_similarity(A, mix @ A, min(r1, d), min(r1, d)) == pytest.approx(1.0, abs=1e-10)
    # Top-i of A inside the top-j of A itself: nested, phi = 1 for every i, j.
    grid = subspace_similarity_grid(A, A)
    torch.testing.assert_close(grid, torch.ones_like(grid), atol=1e-10, rtol=0)
    # A2 whose rows contain A's row space (r2 >= r1) also gives 1 at i = r1.
    if r2 >= r1 and r2 <= d:
        A2 = torch.cat([A, torch.randn(r2 - r1, d, generator=g, dtype=torch.float64)])
        assert subspace_similarity(A, A2, r1, r2) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("r1, r2, d", [(4, 4, 8), (3, 7, 41), (1, 1, 2)])
def test_orthogonal_subspaces_give_zero(r1, r2, d):
    Q = orthonormal_rows(r1 + r2, d, seed=1)
    A1 = with_singular_values(Q[:r1], list(range(r1, 0, -1)))
    A2 = with_singular_values(Q[r1:], list(range(r2, 0, -1)))
    grid = subspace_similarity_grid(A1, A2)
    assert grid.shape == (r1, r2)
    assert grid.abs().max() < 1e-12


def test_known_partial_overlap():
    # A1's directions q0..q3; A2's top two are q0, q1, then two new directions q4, q5.
    Q = orthonormal_rows(6, 23, seed=2)
    A1 = with_singular_values(Q[:4], [4, 3, 2, 1])
    A2 = with_singular_values(torch.cat([Q[:2], Q[4:]]), [8, 6, 2, 1])
    expected = {(4, 4): 2 / 4, (2, 2): 1.0, (1, 2): 1.0, (4, 2): 1.0, (4, 3): 2 / 3, (3, 4): 2 / 3,
                (1, 1): 1.0, (2, 1): 1.0, (3, 3): 2 / 3}
    grid = subspace_similarity_grid(A1, A2)
    for (i, j), phi in expected.items():
        assert subspace_similarity(A1, A2, i, j) == pytest.approx(phi, abs=1e-12)
        assert grid[i - 1, j - 1].item() == pytest.approx(phi, abs=1e-12)
    # Rotating one shared direction by theta leaves cos^2(theta) of it.
    theta = 0.3
    rotated = torch.stack([Q[0], np.cos(theta) * Q[1] + np.sin(theta) * Q[5]])
    A3 = with_singular_values(rotated, [2, 1])
    assert subspace_similarity(A1, A3, 2, 2) == pytest.approx((1 + np.cos(theta) ** 2) / 2, abs=1e-12)


@pytest.mark.parametrize("r1, r2, d", [(8, 64, 70), (5, 3, 9), (2, 9, 341)])
def test_grid_matches_principal_angle_reference(r1, r2, d):
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(2, d, generator=g, dtype=torch.float64)  # some overlap, not all
    A1 = torch.cat([shared, torch.randn(r1 - 2 if r1 > 2 else 0, d, generator=g, dtype=torch.float64)])[:r1]
    A2 = torch.randn(r2, d, generator=g, dtype=torch.float64)
    A2[:2] += 3 * shared
    grid = subspace_similarity_grid(A1, A2)
    for i, j in [(1, 1), (r1, r2), (min(r1, 3), min(r2, 5)), (r1, 1)]:
        ref = reference_phi(A1.numpy(), A2.numpy(), i, j)
        assert grid[i - 1, j - 1].item() == pytest.approx(ref, abs=1e-9)
        assert subspace_similarity(A1, A2, i, j) == pytest.approx(ref, abs=1e-9)
    assert float(grid.min()) >= -1e-12 and float(grid.max()) <= 1 + 1e-12


def test_random_subspaces_overlap_by_max_over_d():
    # Two independent uniformly random subspaces of dims i <= j in R^d:
    # E ||U1^T U2||_F^2 = i j / d, so E phi = j / d (= max(i, j) / d).
    d, i, j, trials = 32, 4, 8, 100
    g = torch.Generator().manual_seed(4)
    phis = [subspace_similarity(torch.randn(i, d, generator=g), torch.randn(j, d, generator=g), i, j)
            for _ in range(trials)]
    assert np.mean(phis) == pytest.approx(j / d, rel=0.1)


def test_low_precision_inputs_match_float64():
    # Inputs are read exactly into float64, so the answer does not depend on their dtype.
    g = torch.Generator().manual_seed(5)
    A1, A2 = torch.randn(4, 33, generator=g), torch.randn(6, 33, generator=g)
    ref = subspace_similarity_grid(A1.double(), A2.double())
    for dtype, atol in [(torch.float32, 1e-12), (torch.float16, 1e-12), (torch.bfloat16, 1e-12)]:
        a1, a2 = A1.to(dtype), A2.to(dtype)
        torch.testing.assert_close(subspace_similarity_grid(a1, a2),
                                   subspace_similarity_grid(a1.double(), a2.double()), atol=atol, rtol=0)
    assert ref.dtype == torch.float64


def test_energy_known_singular_values():
    Q1, Q2 = orthonormal_rows(3, 7, seed=6), orthonormal_rows(3, 5, seed=7)
    M = Q2.T @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ Q1  # (5, 7), s = 3, 2, 1
    torch.testing.assert_close(energy_spectrum(M)[:3], torch.tensor([9 / 14, 13 / 14, 1.0], dtype=torch.float64))
    assert energy_captured(M, 1) == pytest.approx(9 / 14)
    assert energy_captured(M, 5) == pytest.approx(1.0)
    assert truncation_error(M, 1) == pytest.approx((5 / 14) ** 0.5)
    assert truncation_error(M, 3) == pytest.approx(0.0, abs=1e-7)
    assert effective_rank(M, 0.9) == 2
    assert effective_rank(M, 0.5) == 1
    assert effective_rank(M, 1.0) == 3
    assert effective_rank(torch.zeros(4, 6)) == 0
    assert energy_captured(torch.zeros(4, 6), 2) == 0.0


@pytest.mark.parametrize("out_f, in_f, r, k", [(9, 41, 8, 3), (16, 16, 4, 4), (5, 3, 7, 2)])
def test_truncate_is_best_rank_k(out_f, in_f, r, k):
    g = torch.Generator().manual_seed(8)
    A, B = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    A_k, B_k = truncate(A, B, k)
    assert A_k.shape == A.shape and B_k.shape == B.shape and A_k.dtype == A.dtype
    M = (B @ A).double()
    U, S, Vh = np.linalg.svd(M.numpy())  # dense reference: Eckart-Young
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    np.testing.assert_allclose((B_k.double() @ A_k.double()).numpy(), best, atol=1e-4 * S[0], rtol=0)
    err = np.linalg.norm(M.numpy() - best) / np.linalg.norm(M.numpy())
    assert truncation_error(M, min(k, min(M.shape))) == pytest.approx(err, abs=1e-6)
    assert (A_k[k:] == 0).all() and (B_k[:, k:] == 0).all()


def make_lora_model(r: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7))
    apply_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules=["0", "2"]))
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p)  # B = 0 at init; give it a trained-looking value
    return model


def test_adapters_from_module_folder_and_dict_agree(tmp_path):
    model = make_lora_model(r=4, seed=0)
    from_module = adapter_matrices(model)
    save_adapter(model, tmp_path / "a")
    from_folder = adapter_matrices(tmp_path / "a")
    assert list(from_module) == list(from_folder) == ["0", "2"]
    for name in from_module:
        for x, y in zip(from_module[name], from_folder[name], strict=True):
            torch.testing.assert_close(x, y)
    grids = compare_adapters(model, str(tmp_path / "a"))
    for grid in grids.values():
        torch.testing.assert_close(grid, torch.ones(4, 4, dtype=torch.float64), atol=1e-10, rtol=0)
    other = make_lora_model(r=2, seed=1)
    grids = compare_adapters(other, from_folder, max_i=2, max_j=3)
    assert set(grids) == {"0", "2"} and all(g.shape == (2, 3) for g in grids.values())
    A1, A2 = from_module["0"][0], adapter_matrices(other)["0"][0]
    assert grids["0"][1, 2].item() == pytest.approx(reference_phi(A2.numpy(), A1.numpy(), 2, 3), abs=1e-9)


@pytest.mark.parametrize("call, match", [
    (lambda A: subspace_similarity(A, A, 0, 1), "i must be in 1..4"),
    (lambda A: subspace_similarity(A, A, 1, 5), "j must be in 1..4"),
    (lambda A: subspace_similarity(A, A, 1.0, 1), "i must be an int"),
    (lambda A: subspace_similarity(A, torch.randn(4, 9), 1, 1), "same number of columns"),
    (lambda A: subspace_similarity(A[0], A, 1, 1), "A1 must be a 2-D"),
    (lambda A: subspace_similarity(A, A.long(), 1, 1), "A2 must be a floating-point"),
    (lambda A: subspace_similarity(A.tolist(), A, 1, 1), "A1 must be a torch.Tensor"),
    (lambda A: subspace_similarity(A * float("nan"), A, 1, 1), "A1 has non-finite"),
    (lambda A: subspace_similarity_grid(A, A, max_i=9), "max_i must be in 1..4"),
    (lambda A: subspace_similarity_grid(torch.empty(0, 8), A), "A1 must not be empty"),
    (lambda A: energy_captured(A, 5), "k must be in 1..4"),
    (lambda A: effective_rank(A, 0.0), "energy must be a number in"),
    (lambda A: effective_rank(A, 1.5), "energy must be a number in"),
    (lambda A: truncate(A, torch.randn(3, 5), 1), "B's columns must equal A's rows"),
    (lambda A: truncate(A, torch.randn(3, 4), 5), "k must be in 1..4"),
    (lambda A: adapter_matrices(42), "source must be an nn.Module"),
    (lambda A: adapter_matrices(nn.Linear(2, 2)), "no LoRA layers"),
    (lambda A: adapter_matrices({"x": A}), r"source\['x'\] must be a pair"),
    (lambda A: compare_adapters({"x": (A, A)}, {"y": (A, A)}), "no layer in common"),
])
def test_bad_inputs_name_the_argument(call, match):
    A = torch.randn(4, 8, generator=torch.Generator().manual_seed(9))
    with pytest.raises((ValueError, TypeError), match=match):
        call(A)
