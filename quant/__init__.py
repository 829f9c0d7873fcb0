"""4-bit weight formats in pure PyTorch: NF4/FP4/INT4 code books, blockwise absmax,
nibble packing, double quantization and `LinearNF4`. The reference for `kernels/`."""
from .state import QuantState

__all__ = ["QuantState"]
