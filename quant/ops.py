"""The 4-bit math as PyTorch custom ops (namespace `loralab`), declared once.

Ops (the `QuantState` flattened into tensors and plain ints/strings, as bitsandbytes'
`_ops.py` does, so that the dispatcher, `torch.compile` and `torch.export` see them):

    loralab::dequantize_4bit(packed, absmax, code, offset?, nested_absmax?, nested_code?,
        int blocksize, int nested_blocksize, str quant_type, int[] shape, ScalarType dtype) -> Tensor
    loralab::dequantize_4bit_into(<the same state arguments>, Tensor(a!) out) -> ()
    loralab::linear_4bit(x, packed, <state>, Tensor? bias) -> Tensor        # x @ W.T + bias
    loralab::linear_4bit_grad_input(grad_y, packed, <state>) -> Tensor     # grad_y @ W

where <state> is `absmax, code, offset?, nested_absmax?, nested_code?, blocksize,
nested_blocksize, quant_type, shape`. Each op has a fake (shape and dtype only) kernel;
`linear_4bit`'s autograd formula calls `linear_4bit_grad_input` (W is frozen: no gradient
for it). The plain PyTorch code here is every op's default kernel and the reference. Each
backend registers kernels for its device where it lives: the C loop for "cpu" in
quant/cpu_backend.py, Triton for "cuda" in loralab_kernels/dispatch.py. `quant.force_backend`
(quant/backend.py) forces one of them.

The public wrappers `dequantize_4bit` and `linear_4bit` validate the state
(`QuantState.validate`) before the op call: the C and Triton kernels index raw memory
with its lengths.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .backend import force_backend
from .blockwise import check_out, check_packed, dequantize_into
from .state import FLOAT_DTYPES, QuantState

# ---- flattening a state for the op boundary ----------------------------------------------


def state_args(state: QuantState) -> tuple:
    """The op arguments that stand for `state`, in schema order."""
    return (state.absmax, state.code, state.offset, state.nested_absmax, state.nested_code,
            state.blocksize, state.nested_blocksize, state.quant_type, [int(s) for s in state.shape])


def rebuild_state(absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize,
                  quant_type, shape, dtype=torch.float32) -> QuantState:
    """The `QuantState` that `state_args` flattened (a kernel's view of its arguments)."""
    return QuantState(absmax=absmax, shape=torch.Size(shape), dtype=dtype, blocksize=blocksize,
                      quant_type=quant_type, code=code, offset=offset, nested_absmax=nested_absmax,
                      nested_code=nested_code, nested_blocksize=nested_blocksize)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- the reference (default) kernels --------------------------------------------------------
# `loop` picks the dequantize loop ("torch", or the C loop's "native"/"portable"): the CPU
# backend calls these with its loop, the default kernels with "torch".

def reference_dequantize(packed, absmax, code, offset, nested_absmax, nested_code, blocksize,
                         nested_blocksize, quant_type, shape, dtype, loop="torch") -> Tensor:
    state = rebuild_state(absmax, code, offset, nested_absmax, nested_code, blocksize,
                          nested_blocksize, quant_type, shape)
    out = torch.empty(_numel(shape), dtype=dtype, device=packed.device)  # (n,)
    dequantize_into(packed, state, out, loop)
    return out.view(shape)


def reference_dequantize_into(packed, absmax, code, offset, nested_absmax, nested_code, blocksize,
                              nested_blocksize, quant_type, shape, out, loop="torch") -> None:
    state = rebuild_state(absmax, code, offset, nested_absmax, nested_code, blocksize,
                          nested_blocksize, quant_type, shape)
    dequantize_into(packed, state, out.view(-1), loop)


def reference_linear(x, packed, absmax, code, offset, nested_absmax, nested_code, blocksize,
                     nested_blocksize, quant_type, shape, bias, loop="torch") -> Tensor:
    """`x @ W.T + bias` with W dequantized to x's dtype (freed after the call).
    Shapes: x (..., K), W (N, K), bias (N,) -> (..., N)."""
    weight = reference_dequantize(packed, absmax, code, offset, nested_absmax, nested_code,
                                  blocksize, nested_blocksize, quant_type, shape, x.dtype, loop)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def reference_grad_input(grad_y, packed, absmax, code, offset, nested_absmax, nested_code, blocksize,
                         nested_blocksize, quant_type, shape, loop="torch") -> Tensor:
    """`grad_y @ W` with W dequantized again, in grad_y's dtype. Shapes: (..., N) @ (N, K) -> (..., K)."""
    weight = reference_dequantize(packed, absmax, code, offset, nested_absmax, nested_code,
                                  blocksize, nested_blocksize, quant_type, shape, grad_y.dtype, loop)
    return grad_y @ weight


# ---- the ops -----------------------------------------------------------------------------
# Declared with `torch.library.define` and registered with `impl`, as bitsandbytes' _ops.py
# does, rather than with `torch.library.custom_op`: custom_op's Python autograd wrapper cost
# ~120 us per forward + backward of a small layer here (it re-reads the 12-argument schema
# on every call), more than a 64x64 layer's whole step.

_STATE = ("Tensor absmax, Tensor code, Tensor? offset, Tensor? nested_absmax, Tensor? nested_code, "
          "int blocksize, int nested_blocksize, str quant_type, int[] shape")
_LIB = torch.library.Library("loralab", "DEF")  # module-level: the ops live as long as it does
_LIB.define(f"dequantize_4bit(Tensor packed, {_STATE}, ScalarType dtype) -> Tensor")
_LIB.define(f"dequantize_4bit_into(Tensor packed, {_STATE}, Tensor(a!) out) -> ()")
_LIB.define(f"linear_4bit(Tensor x, Tensor packed, {_STATE}, Tensor? bias) -> Tensor")
_LIB.define(f"linear_4bit_grad_input(Tensor grad_y, Tensor packed, {_STATE}) -> Tensor")

# The PyTorch reference is the default kernel of every device (a backend's registration
# for its device takes precedence).
for _name, _fn in (("dequantize_4bit", reference_dequantize),
                   ("dequantize_4bit_into", reference_dequantize_into),
                   ("linear_4bit", reference_linear), ("linear_4bit_grad_input", reference_grad_input)):
    _LIB.impl(_name, _fn, "CompositeExplicitAutograd")


@torch.library.register_fake("loralab::dequantize_4bit")
def _(packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize,
      quant_type, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("loralab::dequantize_4bit_into")
def _(packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize,
      quant_type, shape, out):
    return None


@torch.library.register_fake("loralab::linear_4bit")
def _(x, packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize,
      quant_type, shape, bias):
    return x.new_empty((*x.shape[:-1], shape[0]))  # (..., N)


@torch.library.register_fake("loralab::linear_4bit_grad_input")
def _(grad_y, packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize,
      quant_type, shape):
    return grad_y.new_empty((*grad_y.shape[:-1], shape[1]))  # (..., K)


class _Linear4bitAutograd(torch.autograd.Function):
    """The autograd formula of `loralab::linear_4bit` (its "Autograd" kernel).

    For y = x W^T + b with x (M, K), W (N, K), g = dL/dy (M, N):
        dL/dx = g W          `loralab::linear_4bit_grad_input` (W dequantized again)
        dL/db = sum_m g[m]   (N,)
        dL/dW: none (W is frozen; `packed` holds integer codes).
    Only the 4-bit weight is saved: nothing dense is kept between forward and backward.
    """

    @staticmethod
    def forward(ctx, x, packed, absmax, code, offset, nested_absmax, nested_code, blocksize,
                nested_blocksize, quant_type, shape, bias):
        with torch._C._AutoDispatchBelowAutograd():  # on to the device's kernel
            y = LINEAR(x, packed, absmax, code, offset, nested_absmax, nested_code, blocksize,
                       nested_blocksize, quant_type, shape, bias)
        ctx.save_for_backward(packed, absmax, code, offset, nested_absmax, nested_code)
        ctx.state = (blocksize, nested_blocksize, quant_type, shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = GRAD_INPUT(grad_y, *ctx.saved_tensors, *ctx.state)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[11]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)  # (M, N) -> (N,)
        return (grad_x,) + (None,) * 10 + (grad_bias,)


_LIB.impl("linear_4bit", _Linear4bitAutograd.apply, "Autograd")

# The overloads, looked up once (a call through them skips the attribute lookups).
DEQUANTIZE = torch.ops.loralab.dequantize_4bit.default
DEQUANTIZE_INTO = torch.ops.loralab.dequantize_4bit_into.default
LINEAR = torch.ops.loralab.linear_4bit.default
GRAD_INPUT = torch.ops.loralab.linear_4bit_grad_input.default
OP_NAMES = ("loralab::dequantize_4bit", "loralab::dequantize_4bit_into", "loralab::linear_4bit",
            "loralab::linear_4bit_grad_input")

# ---- the public wrappers -------------------------------------------------------------------

IMPLS = ("auto", "native", "torch")  # dequantize_4bit's deprecated `impl=`


def _impl_block(impl: str):
    """`impl=` (deprecated) as a `force_backend` block; "auto" leaves the backend as it is."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return contextlib.nullcontext() if impl == "auto" else force_backend(impl)


# Eager dequantize calls on plain CPU tensors go straight to the CPU kernel the dispatcher
# would pick: the dispatcher's call into a Python kernel with this 12-argument schema cost
# ~40 us here, a fifth of a 1024x1024 bf16 dequantize. Filled by quant/cpu_backend.py.
# Traced code (torch.compile, export), dispatch modes and tensor subclasses still see the op.
# linear_4bit always goes through the op: its autograd formula is registered there.
EAGER_CPU: dict[str, object] = {}


def _call(op, name: str, packed: Tensor, *args):
    kernel = EAGER_CPU.get(name)
    if (kernel is None or type(packed) is not Tensor or packed.device.type != "cpu"
            or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None):
        return op(packed, *args)
    return kernel(packed, *args)


def dequantize_4bit(packed: Tensor, state: QuantState, dtype: torch.dtype | None = None,
                    impl: str = "auto", out: Tensor | None = None) -> Tensor:
    """Inverse of `quantize_4bit`: `code[q] * absmax[block]`, computed in float32.

    Args:
        packed: `uint8` codes, `(n + 1) // 2` bytes in any shape (bitsandbytes uses `(n // 2, 1)`).
        state: the `QuantState` returned with them.
        dtype: output dtype; default out's dtype, else `state.dtype`.
        impl: deprecated; use `quant.force_backend`. "auto" (the kernel of the tensors'
            device: the C loop on the CPU when built), "native" (the C loop, or an error) or
            "torch" (PyTorch ops only). All give the same bits.
        out: optional contiguous tensor of `state.numel` elements (any shape) on packed's
            device to write into, as bitsandbytes' `out=`; its dtype is the output dtype.
            Reusing one buffer saves allocating (and page-faulting) a new weight per call.

    Returns:
        Tensor of `state.shape` and `dtype` (a view of `out` when given).
    """
    check_packed(packed, state)
    if dtype is None:
        dtype = out.dtype if isinstance(out, Tensor) else state.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if out is not None:
        flat_out = check_out(out, packed, state, dtype)
    with _impl_block(impl):
        if out is None:
            return _call(DEQUANTIZE, "dequantize_4bit", packed, *state_args(state), dtype)
        _call(DEQUANTIZE_INTO, "dequantize_4bit_into", packed, *state_args(state), flat_out)
    return flat_out.view(state.shape)


def linear_4bit(x: Tensor, packed: Tensor, state: QuantState, bias: Tensor | None = None) -> Tensor:
    """`x @ dequantize(W).T + bias` for a frozen 4-bit W, differentiable in x and bias.

    Args:
        x: (..., K) floating-point activations.
        packed, state: the 4-bit weight of shape (N, K), from `quantize_4bit`.
        bias: optional (N,) tensor (cast to x's dtype).

    Returns:
        (..., N) tensor of x's dtype. The kernel is chosen by x's device (`quant.force_backend`
        overrides it); backward dequantizes W again instead of keeping it.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a quant.QuantState, got {type(state).__name__}")
    state.validate(packed)
    if len(state.shape) != 2:
        raise ValueError(f"state.shape must be 2-D (out_features, in_features), got {tuple(state.shape)}")
    if x.dim() == 0 or x.shape[-1] != state.shape[1]:
        raise ValueError(f"x must have last dimension in_features={state.shape[1]}, got {tuple(x.shape)}")
    return LINEAR(x, packed, *state_args(state), bias)
