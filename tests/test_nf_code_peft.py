"""NF3/NF2 code books at revision 2: NF4's outer quantile 0.9677083 at every width, as LoftQ's
reference code and PEFT's `NFQuantizer` (PEFT <= 0.19) build them, so a k-bit LoftQ here and
PEFT's LoftQ with the same code are the same algorithm on the same levels."""
import math

import pytest
import torch
from scipy.stats import norm

from lora.init import loftq, loftq_error
from quant import normal_float_code
from quant.codes import NF4_OFFSET, centered_offset, code_levels, code_revision

peft_loftq = pytest.importorskip("peft.utils.loftq_utils")


def peft_create_normal_map(offset=0.9677083, symmetric=False, num_bits=2):
    """PEFT 0.17.1's `NFQuantizer.create_normal_map` (peft/utils/loftq_utils.py, Apache-2.0),
    copied verbatim (its asymmetric branch) because PEFT 0.20 removed the class; PEFT's own
    where the installed release still has it."""
    quantizer = getattr(peft_loftq, "NFQuantizer", None)
    if quantizer is not None:
        return quantizer.create_normal_map(offset, symmetric, num_bits)
    assert not symmetric
    variations = 2**num_bits
    v1 = norm.ppf(torch.linspace(offset, 0.5, variations // 2 + 1)[:-1]).tolist()
    v2 = [0]
    v3 = (-norm.ppf(torch.linspace(offset, 0.5, variations // 2)[:-1])).tolist()
    values = torch.Tensor(v1 + v2 + v3)
    values = values.sort().values
    values /= values.max()
    return values


def formula_reference(bits: int, offset: float) -> torch.Tensor:
    """QLoRA sec. 3 written out in float64: 2^(k-1) positive quantiles evenly spaced in
    probability from `offset` towards 0.5, 2^(k-1) - 1 negative ones, an exact 0, / max."""
    half = 2 ** (bits - 1)
    pos = [norm.ppf(offset + (0.5 - offset) * i / half) for i in range(half)]
    neg = [-norm.ppf(offset + (0.5 - offset) * i / (half - 1)) for i in range(half - 1)]
    ref = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64)
    return ref / ref.max()


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_code_matches_the_float64_formula(bits):
    # The code takes its probabilities from a float32 linspace (as bitsandbytes and PEFT):
    # each is off by at most ~2 ulp(1) = 2.4e-7. ppf' = 1 / pdf(ppf(p)) is largest at the outer
    # quantile, 1 / pdf(1.848) = 13.8, so a level moves by <= 13.8 * 2.4e-7 / ppf(offset) = 1.8e-6
    # after the division by the largest level (itself off by as much): <= 3.6e-6 in all.
    torch.testing.assert_close(normal_float_code(bits).double(), formula_reference(bits, NF4_OFFSET),
                               atol=4e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_code_equals_peft_create_normal_map(bits):
    assert torch.equal(normal_float_code(bits), peft_create_normal_map(num_bits=bits))
    if bits < 4:
        assert torch.equal(code_levels(f"nf{bits}"), peft_create_normal_map(num_bits=bits))


def test_nf2_levels_and_the_revision_1_code_for_study():
    assert normal_float_code(2).tolist() == pytest.approx([-1, 0, 0.3379152, 1], abs=1e-6)
    # Revision 1 (the offset carried to k bits, QLoRA's construction): kept buildable.
    assert centered_offset(4) == pytest.approx(NF4_OFFSET, abs=1e-7)
    assert centered_offset(2) == pytest.approx(0.5 * (1 - 1 / 6 + 1 - 1 / 8), abs=1e-15)
    old = normal_float_code(2, offset=centered_offset(2))
    torch.testing.assert_close(old.double(), formula_reference(2, centered_offset(2)), atol=4e-6, rtol=0)
    assert old[2] == pytest.approx(0.4358, abs=1e-4)  # the level files of revision 1 hold
    assert code_revision("nf2") == code_revision("nf3") == 2
    assert all(code_revision(t) == 1 for t in ("nf4", "fp4", "int4", "int3", "int2"))
    with pytest.raises(ValueError, match="bits"):
        centered_offset(1)


def peft_loftq_error(W: torch.Tensor, bits: int, r: int, iters: int) -> float:
    """PEFT's `loftq_init` loop (Li et al. 2023, Algorithm 1) as PEFT runs it: quantize the
    residual (4 bits: bitsandbytes' NF4, what `Params4bit` calls; 2 and 3 bits: `NFQuantizer`'s
    nearest level of `create_normal_map` on blocks of 64 scaled by their absmax), then PEFT's own
    `_low_rank_decomposition` of W - dequant(Q)."""
    res = W.clone()
    for _ in range(iters):
        if bits == 4:  # bitsandbytes is an optional extra (the GPU image has none)
            F = pytest.importorskip("bitsandbytes.functional")

            q, st = F.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
            deq = F.dequantize_4bit(q, st)
        else:
            table = peft_create_normal_map(num_bits=bits)
            blocks = res.flatten().reshape(-1, 64)  # (L, 64)
            absmax = blocks.abs().max(dim=-1, keepdim=True).values
            idx = ((blocks / absmax).unsqueeze(-1) - table).abs().argmin(dim=-1)  # (L, 64)
            deq = (table[idx] * absmax).reshape(W.shape)
        out = peft_loftq._low_rank_decomposition(W - deq, reduced_rank=r)
        L, R = out["L"], out["R"]
        res = W - L @ R
    return float(torch.linalg.matrix_norm(W.double() - deq.double() - L.double() @ R.double()))


def weight(kind: str) -> torch.Tensor:
    """A Gaussian (128, 192) weight, or a heavy-tailed (96, 192) one: Student's t with 3 degrees
    of freedom, z / sqrt(chi2_3 / 3), whose few large values set their blocks' absmax. Rows are
    whole blocks of 64: bitsandbytes 0.50.2's CPU `dequantize_4bit` misplaces values when a row
    is not (its codes are right; e.g. (96, 160): 89% of the values differ from the codes' values)."""
    g = torch.Generator().manual_seed(0)
    if kind == "gaussian":
        return torch.randn(128, 192, generator=g) * 0.02
    z, chi2 = torch.randn(96, 192, generator=g), torch.randn(3, 96, 192, generator=g).pow(2).sum(0)
    return z / (chi2 / 3).sqrt() * 0.02


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("kind", ["gaussian", "student_t3"])
def test_loftq_error_no_larger_than_peft_with_the_same_code(kind, bits):
    W = weight(kind)
    # Same code, quantizer and algorithm: the two differ only by float32 rounding in the SVD
    # (factors off by ~1e-6 of ||W||, so the error by ~1e-6 relative) and by codes flipped at a
    # bin midpoint, where both choices give the same error to first order. 1e-5 covers that.
    for iters in (1, 5):
        ours = loftq_error(W, loftq(W, bits, 8, iters, blocksize=64, double_quant=False))
        theirs = peft_loftq_error(W, bits, 8, iters)
        assert ours <= theirs * (1 + 1e-5), (kind, bits, iters, ours, theirs)
        assert math.isfinite(ours) and ours < float(W.norm())
