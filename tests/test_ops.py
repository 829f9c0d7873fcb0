"""The `loralab` 4-bit custom ops: `torch.library.opcheck` over a table of states, the
kernel registry (which backend serves which device, who registers it), and the one override."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quant
from quant import force_backend, native, quantize_4bit
from quant.ops import DEQUANTIZE, DEQUANTIZE_INTO, GRAD_INPUT, LINEAR, OP_NAMES, state_args

ROOT = Path(__file__).resolve().parent.parent

STATES = [  # (shape (N, K), quant_type, blocksize, double_quant, activation dtype, bias)
    ((40, 64), "nf4", 64, True, torch.float32, True),
    ((7, 33), "nf4", 64, False, torch.float32, False),  # odd numel: a partial block, a pad nibble
    ((24, 128), "fp4", 32, True, torch.bfloat16, True),
    ((9, 96), "int4", 64, False, torch.float16, False),  # K not a multiple of the blocksize
    ((5, 320), "int4", 128, True, torch.float16, True),
    ((3, 41), "fp4", 64, True, torch.bfloat16, False),
]
IDS = [f"{q}-{n}x{k}-bs{bs}-dq{int(dq)}-{str(dt)[6:]}-{'bias' if b else 'nobias'}"
       for (n, k), q, bs, dq, dt, b in STATES]


def _inputs(shape, quant_type, blocksize, double_quant, dtype, bias, m=(2, 3)):
    g = torch.Generator().manual_seed(sum(shape))
    packed, state = quantize_4bit(torch.randn(shape, generator=g), quant_type, blocksize, double_quant)
    x = torch.randn(*m, shape[1], generator=g).to(dtype).requires_grad_()
    b = torch.randn(shape[0], generator=g).to(dtype).requires_grad_() if bias else None
    return packed, state, x, b


def _backends():
    return ["torch"] + (["native", "portable"] if native.available() else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", STATES, ids=IDS)
def test_opcheck_every_op(case, backend):
    packed, state, x, b = _inputs(*case)
    dtype = x.dtype
    args = state_args(state)
    gy = torch.randn(2, 3, state.shape[0], dtype=dtype)
    with force_backend(backend):
        torch.library.opcheck(DEQUANTIZE, (packed, *args, dtype))
        torch.library.opcheck(DEQUANTIZE_INTO, (packed, *args, torch.empty(state.numel, dtype=dtype)))
        torch.library.opcheck(LINEAR, (x, packed, *args, b))
        torch.library.opcheck(GRAD_INPUT, (gy, packed, *args))


@pytest.mark.parametrize("case", STATES[:3], ids=IDS[:3])
def test_ops_equal_the_dense_reference(case):
    """The op path computes exactly `F.linear` over `quant.dequantize_4bit`'s weight."""
    packed, state, x, b = _inputs(*case)
    w = quant.dequantize_4bit(packed, state, x.dtype, impl="torch")
    y = quant.linear_4bit(x, packed, state, b)
    gy = torch.randn_like(y)
    y.backward(gy)
    want = torch.nn.functional.linear(x.detach(), w, None if b is None else b.detach())
    assert torch.equal(y.detach(), want)
    assert torch.equal(x.grad, gy @ w)
    if b is not None:
        assert torch.equal(b.grad, gy.reshape(-1, gy.shape[-1]).sum(0))


def test_backends_give_the_same_bits():
    packed, state, x, b = _inputs(*STATES[0])
    results = []
    for backend in _backends():
        with force_backend(backend):
            results.append(quant.linear_4bit(x, packed, state, b))
    assert all(torch.equal(r, results[0]) for r in results)


REGISTRY = r'''
import json, sys, torch
import quant, quant.linear, quant.ops, quant.blockwise
names = %s
def registry():
    return {n: [torch._C._dispatch_has_kernel_for_dispatch_key(n, k) for k in ("CPU", "CUDA")]
            for n in names}
mods = ("quant", "quant.linear", "quant.ops", "quant.blockwise", "quant.backend")
def snapshot():
    return {m: {k: id(v) for k, v in vars(sys.modules[m]).items()} for m in mods}
before, dicts = registry(), snapshot()
import loralab_kernels
after = registry()
print(json.dumps({"before": before, "after": after, "patched": dicts != snapshot(),
                  "kernels_in_quant": [m for m in mods if "loralab_kernels" in vars(sys.modules[m])]}))
'''


def test_quant_alone_has_no_cuda_kernel_and_kernels_registers_one_without_patching():
    """Fresh process: `import quant` gives CPU kernels (and the PyTorch default elsewhere);
    `import loralab_kernels` adds the CUDA kernels through the dispatcher and changes no quant module."""
    code = REGISTRY % repr(list(OP_NAMES))
    env_out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert env_out.returncode == 0, env_out.stderr
    res = json.loads(env_out.stdout)
    for name in OP_NAMES:
        assert res["before"][name] == [True, False], name  # CPU: the C loop; CUDA: default only
        assert res["after"][name] == [True, True], name  # CUDA: Triton, registered by kernels
    assert res["patched"] is False and res["kernels_in_quant"] == []


def test_cuda_kernels_are_registered_here():
    import loralab_kernels  # noqa: F401

    for name in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name


def test_force_backend_routes_to_triton_and_back(monkeypatch):
    pytest.importorskip("triton")
    import loralab_kernels
    import loralab_kernels.matmul

    calls = []
    original = loralab_kernels.matmul.matmul_4bit
    monkeypatch.setattr(loralab_kernels.matmul, "matmul_4bit", lambda *a: calls.append(1) or original(*a))
    packed, state, x, b = _inputs((24, 64), "nf4", 64, True, torch.float32, True)
    y_auto = quant.linear_4bit(x, packed, state, b)
    assert calls == []  # CPU tensors: quant's CPU kernel
    with force_backend("triton"):
        y_triton = quant.linear_4bit(x, packed, state, b)
    assert calls == [1]
    torch.testing.assert_close(y_triton, y_auto, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv(quant.backend.ENV_VAR, "triton")
    quant.linear_4bit(x, packed, state, b)
    assert calls == [1, 1]
    with force_backend("torch"):  # the block beats the variable
        quant.linear_4bit(x, packed, state, b)
    assert calls == [1, 1]


def test_override_values_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with force_backend("cuda"):
            pass
    monkeypatch.setenv("LORALAB_BACKEND", "fast")
    with pytest.raises(ValueError, match="LORALAB_BACKEND must be one of"):
        quant.requested_backend()
    monkeypatch.delenv("LORALAB_BACKEND")
    monkeypatch.setenv("LORALAB_KERNELS", "torch")  # the deprecated variable still counts
    assert quant.requested_backend() == "torch"
    monkeypatch.setenv("LORALAB_KERNELS", "native")
    with pytest.raises(ValueError, match="LORALAB_KERNELS='native' is not one of"):
        quant.requested_backend()


def test_forced_native_without_the_c_loop_raises(monkeypatch):
    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", "no C compiler found")
    packed, state, x, b = _inputs(*STATES[0])
    with force_backend("portable"), pytest.raises(RuntimeError, match="no C compiler found"):
        quant.linear_4bit(x, packed, state, b)
    quant.linear_4bit(x, packed, state, b)  # auto falls back to PyTorch


def test_wrappers_validate_before_the_op():
    packed, state, x, b = _inputs(*STATES[0])
    import dataclasses
    bad = dataclasses.replace(state, blocksize=0)
    with pytest.raises(ValueError, match="state.blocksize"):
        quant.linear_4bit(x, packed, bad, b)
    with pytest.raises(ValueError, match="x must have last dimension in_features=64"):
        quant.linear_4bit(x[..., :32], packed, state, b)
    with pytest.raises(TypeError, match="state must be a quant.QuantState"):
        quant.linear_4bit(x, packed, state.to_dict(), b)


def test_export_traces_the_layer_to_one_op():
    """torch.export sees the 4-bit math as one `loralab.linear_4bit` node (its fake kernel), and
    the exported program, unlifted back into a module, gives the layer's exact output. (The
    layer's code book buffer is `code_book`: a buffer named `code` at the root clashes with
    `torch.fx.GraphModule.code` when `ep.module()` unlifts it.)"""
    torch.manual_seed(0)
    for double_quant in (True, False):
        layer = quant.Linear4bit(64, 24, compute_dtype=torch.float32, double_quant=double_quant)
        x = torch.randn(3, 64)
        ep = torch.export.export(layer, (x,))
        targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert targets.count("loralab.linear_4bit.default") == 1, targets
        assert not any("dequantize" in t or "mm" in t for t in targets), targets
        x2 = torch.randn(3, 64)
        assert torch.equal(ep.module()(x2), layer(x2))


def test_names():
    import loralab_kernels

    assert quant.LinearNF4 is quant.Linear4bit
    with pytest.warns(DeprecationWarning, match="dequantize_4bit"):
        loralab_kernels.dequantize_nf4(*quantize_4bit(torch.randn(8, 64)))
    assert not hasattr(quant, "NF4LinearFunction") and not hasattr(loralab_kernels, "NF4LinearFunction")


def test_eager_cpu_dequantize_skips_the_dispatcher_only_where_nothing_watches():
    """The eager fast path gives the op's exact bits, and a dispatch mode still sees the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(3))
    packed, state = quantize_4bit(w)
    fast = quant.dequantize_4bit(packed, state, torch.bfloat16)
    assert torch.equal(fast, DEQUANTIZE(packed, *state_args(state), torch.bfloat16))
    with Record() as rec:
        watched = quant.dequantize_4bit(packed, state, torch.bfloat16)
    assert any("loralab.dequantize_4bit" in op for op in rec.ops), rec.ops
    assert torch.equal(watched, fast)
