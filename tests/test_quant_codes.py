"""Code books and nibble packing: known answers and construction checks."""
import pytest
import torch
from scipy.stats import norm

from quant import (
    dynamic_map_8bit,
    fp4_code,
    get_code,
    int4_code,
    nf4_code,
    normal_float_code,
    pack_nibbles,
    unpack_nibbles,
)

# bitsandbytes' NF4 table (index = 4-bit code), copied from its source.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_nf4_matches_bitsandbytes_table_exactly():
    assert torch.equal(nf4_code(), torch.tensor(BNB_NF4, dtype=torch.float32))


def test_nf4_is_built_from_normal_quantiles():
    # Reference in float64: 8 positive quantiles from [0.9677083, 0.5), 7 negative, zero.
    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1].numpy())
    ref = torch.tensor(sorted(list(pos) + [0.0] + list(neg)), dtype=torch.float64)
    ref = ref / ref.max()
    torch.testing.assert_close(nf4_code().double(), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", range(2, 9))
def test_normal_float_code_shape_zero_and_range(bits):
    code = normal_float_code(bits)
    assert code.shape == (2**bits,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])  # strictly ascending, so no duplicates
    assert code[0] == -1 and code[-1] == 1
    assert (code == 0).sum() == 1 and code[2 ** (bits - 1) - 1] == 0
    # asymmetric: one more positive level than negative ones
    assert (code > 0).sum() == 2 ** (bits - 1) and (code < 0).sum() == 2 ** (bits - 1) - 1


def test_normal_float_equal_mass_bins():
    # Levels are quantiles: consecutive positive levels (in sigma units) enclose equal mass.
    code = normal_float_code(4).double()
    sigma = norm.ppf(0.9677083)
    pos = code[code > 0] * sigma
    mass = torch.tensor(norm.cdf(pos.numpy())).diff()
    torch.testing.assert_close(mass, torch.full_like(mass, mass.mean().item()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_normal_float_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        normal_float_code(bits)


def test_fp4_known_values():
    expected = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float32) / 12
    code = fp4_code()
    assert torch.equal(code[:8], expected)
    assert torch.equal(code[8:], -expected)
    assert torch.signbit(code[8])  # -0 at code 8, as bitsandbytes


def test_int4_levels():
    code = int4_code()
    assert sorted(set((code * 7).round().tolist())) == list(range(-7, 8))
    assert code[0] == 1 and code[-1] == -1


def test_dynamic_map_8bit():
    code = dynamic_map_8bit()
    assert code.shape == (256,) and torch.all(code[1:] > code[:-1])
    assert code[-1] == 1 and (code == 0).sum() == 1
    assert abs(code[0].item() + 0.99297) < 1e-4
    # smallest nonzero magnitude: 10^-6 * 0.55 (first fraction mean)
    assert code.abs()[code != 0].min().item() == pytest.approx(0.55e-6, rel=1e-5)


def test_get_code_bad_type():
    with pytest.raises(ValueError, match="quant_type"):
        get_code("nf5")


def test_pack_known_answer_and_order():
    packed = pack_nibbles(torch.tensor([1, 2, 3, 15, 0]))
    assert packed.tolist() == [0x12, 0x3F, 0x00]  # element 2i in the high nibble
    assert unpack_nibbles(packed, 5).tolist() == [1, 2, 3, 15, 0]


@pytest.mark.parametrize("n", [1, 2, 7, 64, 341])
def test_pack_roundtrip(n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 1) // 2,)
    assert torch.equal(unpack_nibbles(packed, n), codes)
    # reference: the obvious per-element loop
    ref = [(int(codes[2 * i]) << 4) | (int(codes[2 * i + 1]) if 2 * i + 1 < n else 0)
           for i in range((n + 1) // 2)]
    assert packed.tolist() == ref


def test_pack_errors():
    with pytest.raises(ValueError, match="0..15"):
        pack_nibbles(torch.tensor([16]))
    with pytest.raises(TypeError, match="integer"):
        pack_nibbles(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="uint8"):
        unpack_nibbles(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="numel"):
        unpack_nibbles(torch.zeros(3, dtype=torch.uint8), 4)
