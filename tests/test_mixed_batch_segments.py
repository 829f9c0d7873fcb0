"""The batched-matmul path of a mixed batch (lora/row_segments.py): chunks of the rows grouped
by adapter, padded, one bmm for all adapters, and its autograd.Function.

Reference: dense float64 math written per row, `y[t] = result[t] + s_l B_l A_l x[t]` for a
row t with adapter l (nothing for "__base__" rows or adapters a layer lacks), and its
gradients by autograd through that loop. The batched path does the same products summed in
another grouping (padding adds exact zeros), so in float64 each value is within a few ulps
of O(10) sums: ATOL64 = 1e-12 leaves room and still catches a wrong adapter or row (O(1)).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora import LoRALinear
from lora.mixed_batch import BASE, use_adapters
from lora.row_batch import RowAdapters, _batched_ok
from lora.row_segments import SegmentedLoRAUpdate, add_update_, stack_weights

ATOL64 = 1e-12
RANKS = {"a": 3, "b": 1, "c": 4, "d": 2}

# (row names, tokens per row): even segments (no split, no padding), a long segment split in
# chunks and short ones padded, one row per adapter, all rows on one adapter, base rows,
# rows already grouped (the slice path), an adapter with a single row among long ones.
CASES = [
    (["a", "b", "c", "d", "b", "a", "d", "c"], 1),
    (["a", "a", "a", "a", "a", "b", BASE, "c"], 3),
    (["c", "a", "d", "b"], 2),
    (["b", "b", "b"], 5),
    ([BASE, "a", BASE, "c", "c"], 1),
    (["a", "a", "b", "c", BASE], 2),
    (["d", "d", "d", "d", "d", "d", "a"], 1),
]


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = {n: torch.randn(r, 5, generator=g, dtype=torch.float64) for n, r in RANKS.items()}
    B = {n: torch.randn(6, r, generator=g, dtype=torch.float64) for n, r in RANKS.items()}
    s = {n: 0.5 + i / 3 for i, n in enumerate(RANKS)}
    return A, B, s


def _reference(x, result, row_of_token, A, B, s, present):
    """Per token, dense: y[t] = result[t] + s B A x[t] (float64, autograd through it)."""
    out = []
    for t, name in enumerate(row_of_token):
        y = result[t]
        if name in present:
            y = y + s[name] * (B[name] @ (A[name] @ x[t]))
        out.append(y)
    return torch.stack(out)


def _apply(names, per_row, present, in_place=False, seed=0):
    """(x, result, weights, output, reference, row_of_token) of one case through the Function."""
    A, B, s = _weights(seed)
    tokens = len(names) * per_row
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, 5, generator=g, dtype=torch.float64, requires_grad=True)
    result = torch.randn(tokens, 6, generator=g, dtype=torch.float64, requires_grad=True)
    plan = RowAdapters(tuple(names)).plan(tokens, x.device)
    order = [n for n, _, _ in plan.segments if n in present]
    layout = plan.layout(order)
    weights = [A[n].requires_grad_() for n in order] + [B[n].requires_grad_() for n in order]
    scal = [s[n] for n in order]
    start = result * 1.0 if in_place else result  # a non-leaf may be updated in place
    got = SegmentedLoRAUpdate.apply(x, start, layout, scal, in_place, *weights)
    row_of_token = [n for n in names for _ in range(per_row)]
    want = _reference(x, result, row_of_token, A, B, s, set(order))
    return x, result, weights, got, want


@pytest.mark.parametrize("names,per_row", CASES)
@pytest.mark.parametrize("in_place", [False, True])
def test_function_matches_per_row_reference_with_gradients(names, per_row, in_place):
    present = {"a", "b", "c"} if names[0] == "d" else set(RANKS)  # "d" rows: the base on this layer
    x, result, weights, got, want = _apply(names, per_row, present, in_place)
    torch.testing.assert_close(got, want, atol=ATOL64, rtol=0)
    gy = torch.randn_like(got)
    inputs = [x, result, *weights]
    g_got = torch.autograd.grad(got, inputs, gy, retain_graph=True, allow_unused=True)
    g_want = torch.autograd.grad(want, inputs, gy, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_got, g_want, strict=True)):
        if b is None:  # a weight no row used: the reference has no path to it
            assert a is None or a.abs().max() == 0, i
            continue
        torch.testing.assert_close(a, b, atol=ATOL64, rtol=0, msg=f"gradient {i}")


@pytest.mark.parametrize("names,per_row", CASES)
def test_inference_chunks_match_per_row_reference(names, per_row):
    """add_update_ (no autograd): chunks of c = ceil(M / L) tokens, long segments split, short
    ones padded, ranks 3, 1, 4, 2 zero-padded to 4 in the stacks."""
    present = {"a", "b", "c"} if names[0] == "d" else set(RANKS)
    A, B, s = _weights(2)
    tokens = len(names) * per_row
    x = torch.randn(tokens, 5, dtype=torch.float64)
    result = torch.randn(tokens, 6, dtype=torch.float64)
    plan = RowAdapters(tuple(names)).plan(tokens, x.device)
    order = [n for n, _, _ in plan.segments if n in present]
    layout = plan.layout(order)
    assert layout.chunks <= 2 * len(order) and layout.chunks * layout.size <= 2 * layout.bounds[-1]
    scal = torch.tensor([s[n] for n in order], dtype=torch.float64)
    got = add_update_(layout, x, result.clone(), stack_weights([A[n] for n in order], 0),
                      stack_weights([B[n] for n in order], 1), scal)
    want = _reference(x, result, [n for n in names for _ in range(per_row)], A, B, s, set(order))
    torch.testing.assert_close(got, want, atol=ATOL64, rtol=0)


@settings(max_examples=60, deadline=None)
@given(names=st.lists(st.sampled_from(["a", "b", "c", "d", BASE]), min_size=1, max_size=12),
       per_row=st.integers(1, 4), present=st.sets(st.sampled_from(sorted(RANKS)), min_size=1))
def test_any_layout_matches_per_row_reference(names, per_row, present):
    """Any rows (adapters in any order, base rows anywhere, adapters the layer lacks): the
    chunk layout covers each adapter token exactly once, in chunks of its own adapter, and
    both paths equal the per-row reference (ATOL64 as above)."""
    A, B, s = _weights(3)
    tokens = len(names) * per_row
    plan = RowAdapters(tuple(names)).plan(tokens, torch.device("cpu"))
    order = [n for n, _, _ in plan.segments if n in present]
    if not order:
        return  # every row runs the base on this layer: the layer adds nothing (tested elsewhere)
    layout = plan.layout(order)
    row_of_token = [n for n in names for _ in range(per_row)]
    expected = sorted(t for t, n in enumerate(row_of_token) if n in present)
    assert sorted(layout.targets.tolist()) == expected
    slots = layout.slots.view(layout.chunks, layout.size)
    chunk_lora = list(range(layout.chunks)) if layout.lora is None else layout.lora.tolist()
    pad = set() if layout.pad is None else set(layout.pad.tolist())
    for k in range(layout.chunks):
        for j in range(layout.size):
            if k * layout.size + j not in pad:
                assert row_of_token[slots[k, j]] == order[chunk_lora[k]]
    g = torch.Generator().manual_seed(len(names) * 7 + per_row)
    x = torch.randn(tokens, 5, generator=g, dtype=torch.float64)
    result = torch.randn(tokens, 6, generator=g, dtype=torch.float64)
    want = _reference(x, result, row_of_token, A, B, s, set(order))
    scal = torch.tensor([s[n] for n in order], dtype=torch.float64)
    got = add_update_(layout, x, result.clone(), stack_weights([A[n] for n in order], 0),
                      stack_weights([B[n] for n in order], 1), scal)
    torch.testing.assert_close(got, want, atol=ATOL64, rtol=0)
    weights = [A[n] for n in order] + [B[n] for n in order]
    got = SegmentedLoRAUpdate.apply(x, result, layout, [s[n] for n in order], False, *weights)
    torch.testing.assert_close(got, want, atol=ATOL64, rtol=0)


def test_gradcheck_tiny():
    """torch.autograd.gradcheck (float64 finite differences): ranks 3, 1, 4, a base row."""
    names = ["a", "a", "a", "b", BASE, "c"]
    A, B, s = _weights(3)
    plan = RowAdapters(tuple(names)).plan(6, torch.device("cpu"))
    order = ["a", "b", "c"]
    layout = plan.layout(order)
    scal = [s[n] for n in order]
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    result = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    weights = [A[n].clone().requires_grad_() for n in order] + [B[n].clone().requires_grad_() for n in order]
    fn = lambda x, r, *w: SegmentedLoRAUpdate.apply(x, r, layout, scal, False, *w)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, result, *weights))


def test_inference_update_equals_reference_and_skips_padding():
    """add_update_ (no autograd, stacks padded to the largest rank) with inf in a padding
    source row: padding rows are filled with zeros, so nothing leaks into row 0."""
    names = [BASE, "a", "a", "a", "b"]
    A, B, s = _weights(4)
    x = torch.randn(5, 5, dtype=torch.float64)
    x[0] = float("inf")  # a "__base__" row; padding slots read row 0 before the fill
    result = torch.randn(5, 6, dtype=torch.float64)
    plan = RowAdapters(tuple(names)).plan(5, x.device)
    layout = plan.layout(["a", "b"])
    assert layout.pad is not None
    scal = torch.tensor([s["a"], s["b"]], dtype=torch.float64)
    got = add_update_(layout, x, result.clone(), stack_weights([A["a"], A["b"]], 0),
                      stack_weights([B["a"], B["b"]], 1), scal)
    want = _reference(x, result, names, A, B, s, {"a", "b"})
    assert torch.equal(got[0], result[0])  # the base row untouched
    torch.testing.assert_close(got[1:], want[1:], atol=ATOL64, rtol=0)


def _layer(dropout=0.0):
    torch.manual_seed(0)
    layer = LoRALinear(5, 6, r=RANKS["a"], alpha=4, adapter_name="a", dropout=dropout, dtype=torch.float64).double()
    layer.add_adapter("b", r=RANKS["b"], alpha=3, dropout=dropout, dtype=torch.float64)
    with torch.no_grad():
        for n in ("a", "b"):
            layer.lora_B[n].weight.normal_()
    layer.set_adapter(["a", "b"])
    return layer


def test_layer_inference_cache_follows_weight_updates():
    """The cached stacks and scalings of the no-grad path are rebuilt after an in-place weight
    update, a replaced Parameter and a changed scaling."""
    layer = _layer().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    names = ["b", "a", "a", BASE]
    with torch.no_grad(), use_adapters(layer, names):
        first = layer(x)
        layer.lora_B["a"].weight.mul_(3.0)  # bumps _version: the stacks must follow
        second = layer(x)
        layer.lora_A["a"].weight = nn.Parameter(layer.lora_A["a"].weight * -2.0)  # a new Parameter
        third = layer(x)
        layer.scaling["a"] *= 0.25  # the cached scalings must follow too
        fourth = layer(x)
    layer.set_adapter("a")
    with torch.no_grad():
        alone = layer(x[1:3])
    torch.testing.assert_close(fourth[1:3], alone, atol=ATOL64, rtol=0)
    torch.testing.assert_close(third[1:3] - layer.base_layer(x[1:3]), 4 * (alone - layer.base_layer(x[1:3])),
                               atol=ATOL64, rtol=0)
    torch.testing.assert_close(second[1:3] - first[1:3], 2 * (first[1:3] - layer.base_layer(x[1:3])),
                               atol=ATOL64, rtol=0)  # B * 3: the delta tripled


def test_dropout_hooks_and_autocast_take_the_loop_path():
    """Active dropout (a mask per adapter), hooks on A or B, and autocast keep the per-segment
    loop through the adapters' modules; eval-mode dropout takes the batched path."""
    layer = _layer(dropout=0.5)
    x = torch.randn(3, 5, dtype=torch.float64)
    assert not _batched_ok(layer.train(), ["a", "b"], x)
    assert _batched_ok(layer.eval(), ["a", "b"], x)
    calls = []
    handle = layer.lora_A["b"].register_forward_hook(lambda *args: calls.append(1))
    assert not _batched_ok(layer, ["a", "b"], x)
    with use_adapters(layer, ["a", "b", "a"]):
        layer(x)
    assert calls == [1]  # the hook ran: the loop path called the module
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _batched_ok(layer, ["a", "b"], x.float())


def test_active_dropout_draws_the_usual_mask_per_segment():
    """With active dropout the loop path draws each segment's mask as the adapter's usual
    forward does: rows all on one adapter, same seed, same output."""
    layer = _layer(dropout=0.5).train()
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.manual_seed(7)
    with use_adapters(layer, ["a"] * 4):
        got = layer(x)
    layer.set_adapter("a")
    torch.manual_seed(7)
    want = layer(x)
    torch.testing.assert_close(got, want, atol=ATOL64, rtol=0)


def test_float32_adapters_over_bfloat16_base_match_loop_path():
    """Adapters in float32, base output bfloat16: both paths compute the delta in float32 and
    round it once to bfloat16 before adding, so they agree to a bfloat16 rounding of the
    delta (2^-8 relative, the float32 sums differing by ~K 2^-24 can flip one rounding) plus
    the rounding of the sum: |diff| <= 2^-8 (|d| + |y|)."""
    torch.manual_seed(5)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear.from_linear(base, r=4, alpha=8, adapter_name="a", dtype=torch.float32)
    layer.add_adapter("b", r=2, alpha=8, dtype=torch.float32)
    with torch.no_grad():
        for n in ("a", "b"):
            layer.lora_B[n].weight.normal_()
    layer.set_adapter(["a", "b"])
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    names = ["a", "b", BASE, "b", "a", "a"]
    from lora.row_batch import _loop_segments

    with torch.no_grad(), use_adapters(layer, names):
        got = layer(x)
        plan = layer.row_adapters.plan(6, x.device)
        want = _loop_segments(layer, plan, x, layer.base_layer(x))
    assert got.dtype == torch.bfloat16
    y = layer.base_layer(x).float()
    bound = 2.0**-8 * ((want.float() - y).abs() + want.float().abs()) + 1e-30
    assert ((got.float() - want.float()).abs() <= bound).all()
