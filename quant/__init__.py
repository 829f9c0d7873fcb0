"""4-bit weight formats in pure PyTorch: NF4/FP4/INT4 code books, blockwise absmax,
nibble packing, double quantization and `LinearNF4`. The reference for `kernels/`.

On the CPU, `dequantize_4bit` runs a one-pass C loop (`quant.native`, built at first use)
that returns the PyTorch path's exact bits; `impl="torch"` keeps to PyTorch ops."""
from .blockwise import (
    NESTED_BLOCKSIZE,
    VALID_BLOCKSIZES,
    dequantize_4bit,
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
from .linear import LinearNF4, NF4LinearFunction, quantize_model
from .packing import pack_nibbles, unpack_nibbles
from .state import QuantState

__all__ = [
    "NESTED_BLOCKSIZE",
    "VALID_BLOCKSIZES",
    "LinearNF4",
    "NF4LinearFunction",
    "QuantState",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dynamic_map_8bit",
    "fp4_code",
    "get_code",
    "int4_code",
    "nf4_code",
    "normal_float_code",
    "pack_nibbles",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "quantize_model",
    "shared_code",
    "state_absmax",
    "unpack_nibbles",
]
