"""Property tests (hypothesis) for the 4-bit round trip, nibble packing, merge/unmerge and B = 0.

Quantization bound (QLoRA sec. 3, blockwise absmax): with `A_b` the exact absmax of block b
and `A'_b` the stored one (after double quantization), the nearest-level quantizer gives
`|dequant(w) - w| <= h * A_b + |A'_b - A_b|`, where `h` is the largest distance from a
point of [-1, 1] to its nearest code level (half the largest gap between adjacent levels
when the levels reach +-1). The absmax error is bounded separately by the 8-bit
blockwise quantizer of `A_b - offset`: `|A'_b - A_b| <= h8 * N_j`, `N_j` the nested absmax.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lora import LoRALinear
from lora.qlora import QLoRALinear
from quant import (
    NESTED_BLOCKSIZE,
    LinearNF4,
    dequantize_4bit,
    dynamic_map_8bit,
    get_code,
    pack_nibbles,
    quantize_4bit,
    state_absmax,
    unpack_nibbles,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps

shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)


def worst_distance(levels: torch.Tensor) -> float:
    """Largest distance from a point of [-1, 1] to its nearest level (float64)."""
    lv = levels.double().sort().values
    inner = (lv.diff().max() / 2).item()
    return max(inner, (lv[0] + 1).item(), (1 - lv[-1]).item())


@st.composite
def weights(draw):
    shape = draw(shapes)
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * scale
    if draw(st.booleans()):  # a zero block and an outlier, the cases absmax scaling must survive
        w.view(-1)[: min(40, w.numel())] = 0
        w.view(-1)[-1] = 50 * scale
    return w.to(dtype)


def exact_absmax(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = w.reshape(-1).double()  # (n,)
    pad = -flat.numel() % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # (nblocks, blocksize)
    return blocks.abs().amax(dim=1)


@SETTINGS
@given(w=weights(), quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
       blocksize=st.sampled_from([32, 64, 128, 256]), double_quant=st.booleans())
def test_round_trip_error_bound(w, quant_type, blocksize, double_quant):
    packed, state = quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    out = dequantize_4bit(packed, state, dtype=torch.float32)
    assert out.shape == w.shape
    a_exact = exact_absmax(w, blocksize)  # (nblocks,)
    a_stored = state_absmax(state).double()
    h = worst_distance(get_code(quant_type))
    per_block = h * a_exact + (a_stored - a_exact).abs() + 4 * EPS32 * a_stored  # float32 rounding slack
    bound = per_block.repeat_interleave(blocksize)[: w.numel()].view(w.shape)
    err = (out.double() - w.double()).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    if not double_quant:
        torch.testing.assert_close(a_stored, a_exact.float().double(), atol=0, rtol=0)


@SETTINGS
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**31 - 1), spread=st.sampled_from([1e-4, 1.0, 1e3]))
def test_double_quant_absmax_error_bound(n, seed, spread):
    """The double-quantized absmax: error at most h8 (8-bit map) times the nested block's absmax."""
    absmax = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * spread
    w = absmax.repeat_interleave(32)  # (n * 32,): block b has absmax absmax[b] (all values equal)
    _, state = quantize_4bit(w, blocksize=32, double_quant=True)
    stored = state_absmax(state).double()
    centred = absmax.double() - state.offset.double()
    nested = exact_absmax(centred, NESTED_BLOCKSIZE).repeat_interleave(NESTED_BLOCKSIZE)[:n]
    # h8 from the 8-bit map; bitsandbytes' CPU rounding goes through a lookup table, one bin wide
    h8 = worst_distance(dynamic_map_8bit()) + 2.0 / 2**16
    bound = h8 * nested + 4 * EPS32 * (absmax.double() + state.offset.double().abs())
    assert ((stored - absmax.double()).abs() <= bound).all()


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_nibble_packing_round_trips(shape, seed):
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    n = codes.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_nibbles(packed, n).reshape(shape), codes)
    # bitsandbytes' order: element 2i in the high nibble
    flat = codes.reshape(-1)  # (n,)
    assert packed.reshape(-1)[0].item() >> 4 == flat[0].item()


MERGE_TOL = {torch.float64: 1e-12, torch.float32: 4 * EPS32, torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
             torch.float16: 2 * torch.finfo(torch.float16).eps}


def random_lora(in_f, out_f, r, dtype, seed) -> LoRALinear:
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, dtype=dtype)
    layer = LoRALinear.from_layer(base, r=r, alpha=2 * r)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer


@SETTINGS
@given(in_f=st.integers(1, 48), out_f=st.integers(1, 48), r=st.integers(1, 8),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_merge_then_unmerge_restores_weights(in_f, out_f, r, dtype, seed):
    layer = random_lora(in_f, out_f, r, dtype, seed)
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight("default").double()
    x = torch.randn(3, in_f, dtype=dtype)
    y0 = layer(x).double()
    layer.merge()
    y_merged = layer(x).double()
    layer.unmerge()
    assert not layer.merged
    w1 = layer.base_layer.weight.detach()
    scale = (w0.double().abs() + delta.abs()).max().item()
    # float32 merge math, then one rounding to the weight dtype on merge and one on unmerge
    assert (w1.double() - w0.double()).abs().max().item() <= MERGE_TOL[dtype] * scale
    # merged output = unmerged output, up to the rounding of the merged weight
    y_scale = (x.double().abs().sum(-1, keepdim=True) * scale + y0.abs()).max().item()
    assert (y_merged - y0).abs().max().item() <= 2 * MERGE_TOL[dtype] * y_scale


@SETTINGS
@given(lead=st.lists(st.integers(0, 4), min_size=0, max_size=3), in_f=st.integers(1, 40),
       out_f=st.integers(1, 40), r=st.integers(1, 8),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_zero_b_equals_base(lead, in_f, out_f, r, dtype, seed):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, dtype=dtype)
    layer = LoRALinear.from_layer(base, r=r, alpha=16)
    x = torch.randn(*lead, in_f, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (*lead, out_f)
    assert torch.equal(out, base(x))


@pytest.mark.parametrize("shape", [(64, 32), (37, 9)], ids=["round", "odd"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_qlora_zero_b_equals_base(shape, compute_dtype):
    in_f, out_f = shape
    torch.manual_seed(0)
    base = LinearNF4.from_linear(nn.Linear(in_f, out_f), compute_dtype=compute_dtype)
    layer = QLoRALinear.from_layer(base, r=4, alpha=8)
    x = torch.randn(2, 3, in_f).to(compute_dtype)
    assert torch.equal(layer(x), base(x))
