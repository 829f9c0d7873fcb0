"""NF3/NF2 (and INT3/INT2) bases: fewer levels padded into the 4-bit format.

References are written the obvious way in float64: per-block absmax, then the nearest of
the type's real levels by argmin of the distance. Every backend (PyTorch, the C loop, the
Triton interpreter) must return the PyTorch path's bits for the new code tables, the
quantizer must never pick a padding entry, and a state whose table or codes do not fit its
type is refused.
"""
import pytest
import torch

import quant
from lora.init import loftq, loftq_error, loftq_iterates, qpissa
from quant import (
    Linear4bit,
    QuantState,
    dequantize_4bit,
    force_backend,
    native,
    normal_float_code,
    quantize_4bit,
)
from quant.codes import LOW_BIT_BITS, LOW_BIT_COUNT, code_bits, code_levels, get_code

LOW = ("nf3", "nf2", "int3", "int2")
SHAPES = [(40, 64), (7, 33), (5, 130)]  # whole blocks; odd numel (pad nibble); a partial last block


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g)


def reference_quantize(w: torch.Tensor, levels: torch.Tensor, blocksize: int):
    """float64: absmax per block, nearest level by argmin |x / absmax - level|. Returns
    (codes (n,), dequantized (n,), distance to the nearest midpoint (n,) in scaled units)."""
    x = w.double().reshape(-1)
    n = x.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)  # (nb, bs)
    absmax = padded.abs().amax(1, keepdim=True)
    scaled = (padded / absmax).reshape(-1)[:n]  # (n,)
    dist = (scaled[:, None] - levels.double()[None, :]).abs()  # (n, L)
    codes = dist.argmin(1)
    mids = (levels.double()[1:] + levels.double()[:-1]) / 2
    to_mid = (scaled[:, None] - mids[None, :]).abs().amin(1)
    deq = levels.double()[codes] * absmax.expand(-1, blocksize).reshape(-1)[:n]
    return codes, deq, to_mid


def test_code_tables_are_levels_then_zero_padding():
    for qt in LOW:
        levels, table = code_levels(qt), get_code(qt)
        L = LOW_BIT_COUNT[qt]
        assert levels.numel() == L and table.shape == (16,)
        assert torch.equal(table[:L], levels) and torch.all(table[L:] == 0)
        assert torch.all(levels[1:] > levels[:-1]) and levels.min() == -1 and levels.max() == 1
        assert (levels == 0).sum() == 1  # an exact zero, once
        assert code_bits(qt) == LOW_BIT_BITS[qt] and L <= 2 ** code_bits(qt)
    assert torch.equal(code_levels("nf3"), normal_float_code(3))
    assert torch.equal(code_levels("nf2"), normal_float_code(2))
    assert code_levels("int3").mul(3).tolist() == [-3, -2, -1, 0, 1, 2, 3]
    assert code_levels("int2").tolist() == [-1, 0, 1]


@pytest.mark.parametrize("qt", LOW)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_float64_nearest_level(qt, shape):
    """Codes equal the float64 argmin except within float32 rounding of a midpoint: the
    kernel scales by x * (1 / absmax) in float32 (two roundings, <= 2 * 2**-24 relative on
    |x / absmax| <= 1), so only values closer than 1e-6 to a midpoint may go either way."""
    w = _weight(shape)
    packed, state = quantize_4bit(w, qt, 64, double_quant=False)
    codes = quant.unpack_nibbles(packed, w.numel()).long()
    ref_codes, ref_deq, to_mid = reference_quantize(w, code_levels(qt), 64)
    assert int(codes.max()) < LOW_BIT_COUNT[qt]  # never a padding entry
    differ = codes != ref_codes
    assert bool((to_mid[differ] < 1e-6).all())
    assert int(differ.sum()) <= 2  # a near-tie is rare on random data
    # Reconstruction: code[q] * absmax in float32, one rounding of a float64 value <= absmax.
    deq = dequantize_4bit(packed, state, torch.float32).reshape(-1).double()
    same = ~differ
    torch.testing.assert_close(deq[same], ref_deq[same], rtol=2.0**-23, atol=0.0)


@pytest.mark.parametrize("qt", LOW)
def test_zeros_and_extremes_pick_real_levels(qt):
    """A zero (the padding value) must code as the type's own zero, never as an entry >= L."""
    w = torch.zeros(4, 64)
    w[:, ::7] = torch.tensor([1.0, -1.0, 0.5, -0.25, 3.0, -3.0, 1e-30, -1e-30, 2.0, 0.0])[: len(range(0, 64, 7))]
    packed, state = quantize_4bit(w, qt, 64, double_quant=False)
    codes = quant.unpack_nibbles(packed, w.numel())
    zero_code = int((code_levels(qt) == 0).nonzero())
    assert int(codes.max()) < LOW_BIT_COUNT[qt]
    assert bool((codes[w.reshape(-1) == 0] == zero_code).all())


def _backends():
    return ["torch"] + (["native", "portable"] if native.available() else [])


@pytest.mark.parametrize("qt", LOW)
@pytest.mark.parametrize("double_quant", [False, True])
def test_c_loop_gives_the_pytorch_bits(qt, double_quant):
    w = _weight((9, 130), seed=1)
    packed, state = quantize_4bit(w, qt, 64, double_quant)
    x = torch.randn(3, 130, dtype=torch.float32)
    outs = {}
    for backend in _backends():
        with force_backend(backend):
            outs[backend] = (dequantize_4bit(packed, state, torch.bfloat16),
                             quant.linear_4bit(x, packed, state))
    for backend, (deq, y) in outs.items():
        assert torch.equal(deq, outs["torch"][0]), backend
        assert torch.equal(y, outs["torch"][1]), backend


@pytest.mark.parametrize("qt", ["nf3", "nf2", "int2"])
def test_triton_interpreter_gives_the_pytorch_bits(qt):
    """float32 dequantize must match exactly (same product code[q] * absmax); the fused matmul
    accumulates in fp32 in another order: 1e-5 relative on a K = 64 dot product of O(1) terms."""
    pytest.importorskip("triton")
    from loralab_kernels import dequantize_4bit as triton_dequantize
    from loralab_kernels import matmul_4bit

    packed, state = quantize_4bit(_weight((32, 64), seed=2), qt, 32, True)
    want = dequantize_4bit(packed, state, torch.float32)
    assert torch.equal(triton_dequantize(packed, state, torch.float32), want)
    x = torch.randn(4, 64)
    torch.testing.assert_close(matmul_4bit(x, packed, state), x @ want.T, rtol=1e-5, atol=1e-5)


def test_validation_refuses_bad_tables_and_codes(tmp_path):
    packed, state = quantize_4bit(_weight((8, 64)), "nf3", 64, True)
    bad_table = state.code.clone()
    bad_table[12] = 0.5  # a ninth level in a 3-bit type
    with pytest.raises(ValueError, match=r"state.code of quant_type='nf3' must hold its 8 levels"):
        dequantize_4bit(packed, QuantState(**{**state.__dict__, "code": bad_table}))
    bad_codes = packed.clone()
    bad_codes[3] = 0x29  # high nibble 2 (fine), low nibble 9 (no such NF3 level)
    with pytest.raises(ValueError, match=r"codes >= 8, but quant_type='nf3' has only 8 levels"):
        dequantize_4bit(bad_codes, state)
    # An NF4 weight relabelled as NF2 (a file edited by hand): its codes reach past 3.
    p4, s4 = quantize_4bit(_weight((8, 64)), "nf4", 64, False)
    relabelled = QuantState.from_dict({**s4.to_dict(), "quant_type": torch.tensor(list(b"nf2"), dtype=torch.uint8),
                                       "code": get_code("nf2")})
    with pytest.raises(ValueError, match=r"quant_type='nf2' has only 4 levels"):
        dequantize_4bit(p4, relabelled)
    with pytest.raises(ValueError, match=r"quant_type must be one of"):
        quantize_4bit(torch.ones(64), "nf5")


def test_state_round_trip_and_honest_storage():
    """Fewer levels, same bytes: every storage figure is the 4-bit one."""
    w = _weight((48, 128))
    layers = {qt: Linear4bit(128, 48, bias=False, weight=w, quant_type=qt) for qt in ("nf4",) + LOW}
    for qt, layer in layers.items():
        state = layer.quant_state
        assert state.storage_bits == 4 and state.code_bits == (4 if qt == "nf4" else LOW_BIT_BITS[qt])
        assert layer.storage_bytes() == layers["nf4"].storage_bytes()
        assert layer.bits_per_parameter() == layers["nf4"].bits_per_parameter()
        assert state.nbytes() == layers["nf4"].quant_state.nbytes()
        back = QuantState.from_dict(state.to_dict())
        assert back.quant_type == qt and torch.equal(dequantize_4bit(layer.weight_packed, back),
                                                     layer.dequantize(torch.float32))
        fresh = Linear4bit(128, 48, bias=False, quant_type=qt)
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(fresh.dequantize(torch.float32), layer.dequantize(torch.float32))


def test_fewer_bits_more_error_and_normal_float_beats_int():
    """On Gaussian weights: NF4 < NF3 < NF2 and NF_k < INT_k (NF puts its levels at normal quantiles)."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))
    err = {qt: float((dequantize_4bit(*quantize_4bit(w, qt, 64, False)) - w).norm() / w.norm())
           for qt in ("nf4",) + LOW}
    assert err["nf4"] < err["nf3"] < err["nf2"]
    assert err["nf3"] < err["int3"] and err["nf2"] < err["int2"]


@pytest.mark.parametrize("bits", [3, 2])
def test_loftq_low_bits(bits):
    """What LoftQ's alternation guarantees at any bit width: the SVD half-step (eq. 6) is the best
    rank-r fit of W - dequant(Q_t) (Eckart-Young), so it is no worse than keeping the previous
    factors with the new Q_t. The quantization half-step is not a projection (each block's absmax
    moves with the residual), so the total error need not fall every step: on this weight NF2's
    error rises at the fourth step (0.429, 0.407, 0.404, 0.408 relative), NF3's keeps falling."""
    W = _weight((64, 96), seed=4)
    steps = list(loftq_iterates(W, bits, 8, 4))
    assert all(s.base[1].quant_type == f"nf{bits}" for s in steps)
    prev_A = prev_B = None
    for step in steps:
        Q = dequantize_4bit(*step.base).double()
        kept = W.double() - Q if prev_A is None else W.double() - Q - prev_B.double() @ prev_A.double()
        # float32 SVD: the optimum holds up to float32 rounding of the factors, ~1e-6 relative
        assert loftq_error(W, step) <= float(kept.norm()) * (1 + 1e-5)
        prev_A, prev_B = step.A, step.B
    errors = [loftq_error(W, s) for s in steps]
    assert errors[1] < errors[0]  # the first re-quantization helps at every bit width here
    assert loftq_error(W, loftq(W, bits, 8, 4)) == pytest.approx(errors[-1], rel=1e-12)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_qpissa_error_is_the_residual_quantization_error(bits):
    """W - (dequant(Q) + s B A) = (W - s B A) - dequant(quant(W - s B A)): only the base's rounding."""
    W = _weight((64, 96), seed=5)
    res = qpissa(W, bits, 8, scaling=2.0)
    residual = W.double() - 2.0 * (res.B.double() @ res.A.double())
    packed, state = quantize_4bit(residual.float(), f"nf{bits}", 64, True)
    assert torch.equal(packed, res.base[0])
    direct = float((residual - dequantize_4bit(packed, state).double()).norm())
    assert loftq_error(W, res, 2.0) == pytest.approx(direct, rel=1e-6)


def test_loftq_config_builds_low_bit_bases():
    from torch import nn

    import lora.qlora  # noqa: F401
    from lora import LoRAConfig, apply_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    W = model[0].weight.detach().clone()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["0", "2"], init="loftq", loftq_bits=3))
    base = model[0].base_layer
    assert base.quant_type == "nf3" and base.quant_state.code_bits == 3
    approx = base.dequantize(torch.float32) + model[0].scaling["default"] * (
        model[0].lora_B["default"].weight @ model[0].lora_A["default"].weight)
    plain = Linear4bit(64, 96, weight=W, quant_type="nf3").dequantize(torch.float32)
    assert (approx - W).norm() < (plain - W).norm()
    with pytest.raises(ValueError, match=r"loftq_bits=8: there is no 8-bit base format.*allowed"):
        LoRAConfig(r=4, target_modules=["0"], init="loftq", loftq_bits=8)


@pytest.mark.parametrize("quant_type", ["nf4", "nf2"])
def test_loftq_on_an_already_quantized_model(quant_type):
    """PEFT's replace_lora_weights_loftq path: Q kept, B A = SVD_r(W - dequant(Q)). With
    Q = quant(W) that is LoftQ's first step, so the factors equal `loftq(W, iters=1)`'s."""
    from torch import nn

    import lora.qlora  # noqa: F401
    from lora import LoRAConfig, apply_lora
    from lora.init import init_loftq_on_quantized

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quant.quantize_model(model, quant_type=quant_type, compute_dtype=torch.float32)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["0", "2"]), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"no full-precision weight for \['2'\]"):
        init_loftq_on_quantized(model, {"0": weights["0"]})
    with pytest.raises(ValueError, match=r"weights\['2'\] must be a tensor of shape \(32, 96\)"):
        init_loftq_on_quantized(model, {"0": weights["0"], "2": weights["0"]})
    assert torch.all(model[0].lora_B["default"].weight == 0)  # nothing changed by the refused calls
    assert init_loftq_on_quantized(model, weights) == ["0", "2"]
    bits = {"nf4": 4, "nf2": 2}[quant_type]
    want = loftq(weights["0"], bits, 4, 1, scaling=2.0)
    assert torch.equal(model[0].base_layer.weight_packed, want.base[0])
    # Same float32 SVD of the same matrix: equal up to the SVD's sign choice and rounding.
    got = model[0].lora_B["default"].weight @ model[0].lora_A["default"].weight
    torch.testing.assert_close(got, want.B @ want.A, rtol=1e-4, atol=1e-5)
