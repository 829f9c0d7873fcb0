"""4-bit weight formats in pure PyTorch: NF4/FP4/INT4 code books, blockwise absmax,
nibble packing, double quantization and `Linear4bit`. The reference for `loralab_kernels/`.

The 4-bit math is a few PyTorch custom ops (`torch.ops.loralab.*`, quant/ops.py) whose
default kernel is the PyTorch reference. On the CPU a one-pass C loop (`quant.native`,
built at first use, registered in quant/cpu_backend.py) returns the PyTorch path's exact
bits; `loralab_kernels` registers Triton for CUDA. `force_backend(...)` (quant/backend.py) is the
one override of that choice."""
from . import cpu_backend as _cpu_backend  # noqa: F401  (registers the C loop for "cpu")
from .backend import BACKENDS, force_backend, requested_backend
from .blockwise import (
    NESTED_BLOCKSIZE,
    VALID_BLOCKSIZES,
    dequantize_blockwise_8bit,
    quantize_4bit,
    quantize_blockwise_8bit,
    state_absmax,
)
from .codes import (
    dynamic_map_8bit,
    fp4_code,
    get_code,
    int4_code,
    nf4_code,
    normal_float_code,
    shared_code,
)
from .linear import Linear4bit, LinearNF4, quantize_model
from .ops import dequantize_4bit, linear_4bit
from .packing import pack_nibbles, unpack_nibbles
from .state import QuantState

__all__ = [
    "NESTED_BLOCKSIZE",
    "VALID_BLOCKSIZES",
    "BACKENDS",
    "Linear4bit",
    "LinearNF4",
    "QuantState",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dynamic_map_8bit",
    "force_backend",
    "fp4_code",
    "get_code",
    "int4_code",
    "linear_4bit",
    "nf4_code",
    "normal_float_code",
    "pack_nibbles",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "quantize_model",
    "requested_backend",
    "shared_code",
    "state_absmax",
    "unpack_nibbles",
]
