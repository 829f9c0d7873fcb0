"""Segmented LoRA kernels (loralab_kernels/segmented.py) under TRITON_INTERPRET=1 against dense float64
math: odd shapes, empty segments, one row per adapter, all rows on one adapter, skipped
("__base__") segments, ranks padded to the largest, fp16/bf16/fp32; and the mixed-batch
layer path through them.

Tolerance (per element, from the arithmetic): with eps the unit roundoff of the dtype and
`bound = |y0| + s |x| |A|^T |B|^T` (absolute values, float64), the kernels (1) accumulate in
float32 over K and R terms (<= (K + R) eps32 bound), (2) round h to the weight dtype before
the expand dot (<= eps bound) and (3) round the stored y (<= eps bound). So
|got - want| <= (2 eps + (K + R) eps32) bound; we assert that plus a 1e-30 floor.
"""
import pytest
import torch

pytest.importorskip("triton")

from lora.row_segments import stack_weights  # noqa: E402
from loralab_kernels.segmented import (  # noqa: E402
    gather_expand,
    gather_shrink,
    segmented_expand,
    segmented_shrink,
)

EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _problem(t, k, n, ranks, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(dtype)
    As = [torch.randn(r, k, generator=g).to(dtype) for r in ranks]
    Bs = [torch.randn(n, r, generator=g).to(dtype) for r in ranks]
    scal = torch.rand(len(ranks), generator=g) + 0.5  # (L,) float32
    y = torch.randn(t, n, generator=g).to(dtype)
    return x, As, Bs, scal, y


def _reference(x, As, Bs, scal, y, order, bounds, seg_lora):
    """Dense float64: y[rows] += s * x[rows] A^T B^T per segment; also the abs-value bound."""
    want, bound = y.double().clone(), y.double().abs()
    for s, lora in enumerate(seg_lora):
        rows = order[bounds[s]:bounds[s + 1]]
        if lora < 0 or rows.numel() == 0:
            continue
        A, B, xs = As[lora].double(), Bs[lora].double(), x[rows].double()
        want[rows] += float(scal[lora]) * xs @ A.T @ B.T
        bound[rows] += float(scal[lora]) * xs.abs() @ A.abs().T @ B.abs().T
    return want, bound


def _check(got, want, bound, dtype, k, r):
    assert got.dtype == dtype
    tol = (2 * EPS[dtype] + (k + r) * 2.0**-24) * bound + 1e-30
    err = (got.double() - want).abs()
    assert (err <= tol).all(), f"max err {err.max():.3g}, worst ratio {(err / tol).max():.3g}"


CASES = {  # (tokens, K, N, ranks, segment lengths, seg_lora): -1 = "__base__" segment
    "odd shapes, mixed ranks": (23, 41, 37, (3, 7, 16), (5, 0, 11, 4, 3), (0, 1, 2, -1, 1)),
    "one row per adapter": (5, 64, 48, (2, 4, 8, 1, 5), (1, 1, 1, 1, 1), (0, 1, 2, 3, 4)),
    "all rows on one adapter": (37, 33, 20, (9,), (37,), (0,)),
    "base rows only": (6, 16, 16, (4,), (6,), (-1,)),
}


def _layout(t, lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(t, generator=g)[: sum(lengths)]  # rows grouped by segment, any order
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return order, bounds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", ["segmented", "gather"])
def test_shrink_expand_match_reference(case, dtype, variant):
    t, k, n, ranks, lengths, seg_lora = CASES[case]
    x, As, Bs, scal, y = _problem(t, k, n, ranks, dtype)
    order, bounds = _layout(t, lengths)
    want, bound = _reference(x, As, Bs, scal, y, order, bounds, seg_lora)
    a, b = stack_weights(As, 0).to(dtype), stack_weights(Bs, 1).to(dtype)  # (L, R, K), (L, N, R)
    got = y.clone()
    if variant == "segmented":
        seg_start = torch.tensor(bounds, dtype=torch.int32)
        lora = torch.tensor(seg_lora, dtype=torch.int32)
        longest = max(lengths)
        h = segmented_shrink(x, a, scal, order, seg_start, lora, longest)
        segmented_expand(h, b, got, order, seg_start, lora, longest)
    else:
        row_lora = torch.repeat_interleave(torch.tensor(seg_lora, dtype=torch.int32), torch.tensor(lengths))
        h = gather_shrink(x, a, scal, order, row_lora)
        gather_expand(h, b, got, order, row_lora)
    _check(got, want, bound, dtype, k, max(ranks))
    untouched = torch.ones(t, dtype=torch.bool)
    for s, l in enumerate(seg_lora):
        if l >= 0:
            untouched[order[bounds[s]:bounds[s + 1]]] = False
    assert torch.equal(got[untouched], y[untouched])  # base rows and rows outside `order`: bit-identical


def test_bad_inputs_raise():
    x, As, Bs, scal, y = _problem(4, 16, 8, (2,), torch.float32)
    a = stack_weights(As, 0).float()
    order = torch.arange(4)
    with pytest.raises(ValueError, match="seg_start"):
        segmented_shrink(x, a, scal, order, torch.tensor([0, 4], dtype=torch.int32),
                         torch.tensor([0, 0], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="a_stack"):
        segmented_shrink(x, a.half(), scal, order, torch.tensor([0, 4], dtype=torch.int32),
                         torch.tensor([0], dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="order"):
        gather_shrink(x, a, scal, order.float(), order)
    one = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_segment 3 is below the longest segment 4"):
        segmented_shrink(x, a, scal, order, one, torch.tensor([0], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="seg_lora must hold stack indices"):
        segmented_shrink(x, a, scal, order, one, torch.tensor([1], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="order must hold row indices"):
        gather_shrink(x, a, scal, torch.tensor([0, 9]), torch.tensor([0, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="scalings"):
        gather_shrink(x, a, scal.double(), order, torch.zeros(4, dtype=torch.int32))


def _layer_tolerance(layer, x, names):
    """Two float32 computations of a mixed batch each lie within (K + R + 2) eps32 * bound of
    the exact result (module docstring), bound = |x| |W|^T + |b| + s |x| |A|^T |B|^T for the
    row's adapter; so they differ by at most twice that. Shape (rows, tokens, out)."""
    from lora.mixed_batch import BASE

    xa = x.detach().double().abs().reshape(len(names), -1, x.shape[-1])
    bound = xa @ layer.base_layer.weight.double().abs().T + layer.base_layer.bias.double().abs()
    for i, nm in enumerate(names):
        if nm != BASE:
            A, B = layer.lora_A[nm].weight.double().abs(), layer.lora_B[nm].weight.double().abs()
            bound[i] += layer.scaling[nm] * xa[i] @ A.T @ B.T
    r = max(layer.r.values())
    return 2 * (x.shape[-1] + r + 2) * 2.0**-24 * bound


def test_mixed_batch_layer_through_kernels(monkeypatch):
    """`use_adapters` on a LoRALinear with the Triton backend forced (CPU, interpreter): the
    kernel path (gather for 1-token rows, segmented for 20-token rows) equals the PyTorch
    segments within the bound above (float32: K = 40, R = 6)."""
    from lora import LoRALinear
    from lora.mixed_batch import BASE, use_adapters
    from loralab_kernels import segmented
    from quant import force_backend

    calls = []
    for fn in ("gather_shrink", "segmented_shrink"):
        real = getattr(segmented, fn)
        monkeypatch.setattr(segmented, fn, lambda *a, _real=real, _fn=fn: calls.append(_fn) or _real(*a))
    torch.manual_seed(0)
    layer = LoRALinear(40, 24, r=6, alpha=8, adapter_name="a")
    layer.add_adapter("b", r=3, alpha=5)
    with torch.no_grad():
        for nm in ("a", "b"):
            layer.lora_B[nm].weight.normal_()
    names = ["b", BASE, "a", "b"]
    for shape, kernel in (((4, 40), "gather_shrink"), ((4, 20, 40), "segmented_shrink")):
        x = torch.randn(*shape)
        with torch.no_grad(), use_adapters(layer, names):
            want = layer(x)
            with force_backend("triton"):
                got = layer(x)
        assert calls.pop() == kernel and not calls
        err = (got.double() - want.double()).abs()
        assert (err <= _layer_tolerance(layer, x, names).reshape(err.shape)).all()
        assert not torch.equal(got[0], layer.base_layer(x[0]))  # an adapter was added


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["segmented", "gather"])
def test_cuda_kernels_match_reference(dtype, variant):
    """On the GPU (make gpu-check): real bf16/fp16 `tl.dot`, model-like sizes, same bound."""
    t, k, n, ranks = 300, 1024, 2048, (8, 16, 32, 5)
    lengths, seg_lora = (120, 0, 90, 60, 30), (0, 1, 2, -1, 3)
    x, As, Bs, scal, y = _problem(t, k, n, ranks, dtype)
    order, bounds = _layout(t, lengths)
    want, bound = _reference(x, As, Bs, scal, y, order, bounds, seg_lora)
    dev = "cuda"
    a = stack_weights([w.to(dev) for w in As], 0).to(dtype)
    b = stack_weights([w.to(dev) for w in Bs], 1).to(dtype)
    got, x, scal, order = y.to(dev), x.to(dev), scal.to(dev), order.to(dev)
    if variant == "segmented":
        seg_start = torch.tensor(bounds, dtype=torch.int32, device=dev)
        lora = torch.tensor(seg_lora, dtype=torch.int32, device=dev)
        h = segmented_shrink(x, a, scal, order, seg_start, lora, max(lengths))
        segmented_expand(h, b, got, order, seg_start, lora, max(lengths))
    else:
        row_lora = torch.repeat_interleave(torch.tensor(seg_lora, dtype=torch.int32),
                                           torch.tensor(lengths)).to(dev)
        h = gather_shrink(x, a, scal, order, row_lora)
        gather_expand(h, b, got, order, row_lora)
    _check(got.cpu(), want, bound, dtype, k, max(ranks))


def test_segmented_lora_gradients_match_pytorch_segments(monkeypatch):
    """`SegmentedLoRA` (kernels forward, PyTorch backward) through the layer, in training mode,
    against the PyTorch segments: output and the gradients of x and of every adapter's A and
    B. float32, both within (K + R + 2) eps32 * bound of the exact values (module docstring),
    the gradients being sums of the same kind of products (over at most 20 tokens or 24
    outputs, plus the R terms): 2 (20 + 24 + R) eps32 relative to their largest entry, < 1e-5."""
    from lora import LoRALinear
    from lora.mixed_batch import BASE, use_adapters
    from loralab_kernels import segmented
    from quant import force_backend

    calls = []
    real = segmented.SegmentedLoRA.apply
    monkeypatch.setattr(segmented.SegmentedLoRA, "apply", lambda *a: calls.append(1) or real(*a))

    torch.manual_seed(0)
    layer = LoRALinear(40, 24, r=6, alpha=8, adapter_name="a")
    layer.add_adapter("b", r=3, alpha=5)
    layer.set_adapter(["a", "b"])
    with torch.no_grad():
        for nm in ("a", "b"):
            layer.lora_B[nm].weight.normal_()
    names = ["b", BASE, "a", "b"]
    x = torch.randn(4, 5, 40)
    g = torch.randn(4, 5, 24)
    results = []
    for backend in ("torch", "triton"):
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        with use_adapters(layer, names), force_backend(backend):
            y = layer(xg)
        (y * g).sum().backward()
        grads = [xg.grad] + [getattr(layer, k)[n].weight.grad for n in ("a", "b") for k in ("lora_A", "lora_B")]
        results.append((y.detach(), grads))
    (y0, g0), (y1, g1) = results
    assert calls == [1]  # the triton pass went through SegmentedLoRA, the torch pass did not
    assert ((y1 - y0).abs().double() <= _layer_tolerance(layer, x, names)).all()
    for a, b in zip(g1, g0, strict=True):
        assert a is not None and b is not None
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
