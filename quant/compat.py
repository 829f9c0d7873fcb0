"""Convert `QuantState` to and from bitsandbytes' `QuantState` (bitsandbytes is optional).

The packed bytes need no conversion beyond a reshape: bitsandbytes stores them as
`((n + 1) // 2, 1)`, this library as `((n + 1) // 2,)`.
"""
from __future__ import annotations

import torch

from .codes import dynamic_map_8bit, get_code
from .state import QuantState


def to_bitsandbytes(packed: torch.Tensor, state: QuantState):
    """Return `(packed, bnb_state)` that `bitsandbytes.functional.dequantize_4bit` accepts."""
    import bitsandbytes.functional as bnbf

    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    state.validate(packed)  # bitsandbytes' kernels index memory with these lengths too
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes supports quant_type 'nf4' or 'fp4', got {state.quant_type!r}")
    state2 = None
    if state.double_quant:
        state2 = bnbf.QuantState(absmax=state.nested_absmax, code=state.nested_code,
                                 blocksize=state.nested_blocksize, dtype=torch.float32)
    bnb_state = bnbf.QuantState(absmax=state.absmax, shape=state.shape, code=state.code,
                                blocksize=state.blocksize, quant_type=state.quant_type,
                                dtype=state.dtype, offset=state.offset, state2=state2)
    return packed.reshape(-1, 1), bnb_state  # (n_bytes, 1): bitsandbytes' layout


def from_bitsandbytes(packed: torch.Tensor, bnb_state) -> tuple[torch.Tensor, QuantState]:
    """Return `(packed, QuantState)` for a weight quantized by `bitsandbytes.functional.quantize_4bit`."""
    if bnb_state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes quant_type must be 'nf4' or 'fp4', got {bnb_state.quant_type!r}")
    code = bnb_state.code if bnb_state.code is not None else get_code(bnb_state.quant_type)
    state = QuantState(absmax=bnb_state.absmax, shape=torch.Size(bnb_state.shape), dtype=bnb_state.dtype,
                       blocksize=int(bnb_state.blocksize), quant_type=bnb_state.quant_type,
                       code=code.float())
    if bnb_state.nested:
        state2 = bnb_state.state2
        state.offset = torch.as_tensor(bnb_state.offset, dtype=torch.float32).reshape(())
        state.nested_absmax = state2.absmax
        state.nested_code = state2.code if state2.code is not None else dynamic_map_8bit()
        state.nested_blocksize = int(state2.blocksize)
    packed = packed.reshape(-1)  # (n_bytes,)
    state.validate(packed)
    return packed, state
