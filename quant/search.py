"""Nearest 4-bit level of each scaled value, exactly as `torch.bucketize` finds it, but faster.

Reference: with `bounds` the 15 midpoints (L - 1 for a type of L < 16 levels) between consecutive sorted levels, the sorted
index of x is the number of bounds strictly below x (`torch.bucketize(x, bounds)`), so a
value exactly on a midpoint goes to the lower level. bitsandbytes' CPU quantizer does
exactly this.

Fast path: cut [-1, 1] into `2 * GRID_HALF` equal bins, narrower than the smallest gap
between two bounds (FP4's 0.0026), so each bin (widened by a margin that covers float32
rounding) holds at most one bound. Per bin we store the count of bounds below it and the
one bound inside it (or +inf); then `index = count[bin] + (x > bound[bin])`. This equals
the binary search for every float32 x (two table look-ups and one compare instead of a
four-step search), and the tests check it against `torch.bucketize` on random values,
on every bound and on their float32 neighbours.
"""
from __future__ import annotations

import functools

import torch

from .codes import code_levels

GRID_HALF = 1024  # bins per unit: bin width 1/1024 < 0.0026, FP4's smallest gap between bounds
_MARGIN = 1e-6  # in scaled units: covers float32 rounding of x * (1/absmax) and of the bin index


@functools.lru_cache(maxsize=8)
def sorted_bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(bounds, order)`: midpoints between consecutive sorted levels (L - 1,) and the 4-bit code
    of each sorted level (L,) uint8 (identity for NF4; +0 sorts before -0 in FP4, as bitsandbytes).
    L = 16, or fewer for "nf3"/"nf2"/"int3"/"int2": only their real levels, never the padding."""
    code = code_levels(quant_type)
    order = torch.argsort(code, stable=True)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2  # (L - 1,) float32
    return bounds, order.to(torch.uint8)


def nearest_codes_reference(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The obvious way: binary search over the bounds, then map sorted index -> code. `uint8`."""
    bounds, order = sorted_bounds(quant_type)
    idx = torch.bucketize(scaled, bounds.to(scaled.device))
    return order.to(scaled.device)[idx]


@functools.lru_cache(maxsize=8)
def _grid_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Per bin j (x in about [j/GRID_HALF - 1, (j+1)/GRID_HALF - 1)): the code when x is
    below the bin's bound, the code when above it, the bound (+inf if none), and whether
    codes are sorted indices (then "above" simply adds one)."""
    bounds, order = sorted_bounds(quant_type)
    nbins = 2 * GRID_HALF + 1  # one extra bin for x == 1 (and 1 + rounding)
    j = torch.arange(nbins, dtype=torch.float64)
    lo = j / GRID_HALF - 1 - _MARGIN
    hi = (j + 1) / GRID_HALF - 1 + _MARGIN
    b = bounds.double()
    below = (b[None, :] < lo[:, None]).sum(dim=1)  # (nbins,) bounds entirely below the bin
    inside = (b[None, :] >= lo[:, None]) & (b[None, :] <= hi[:, None])  # (nbins, L - 1)
    if int(inside.sum(dim=1).max()) > 1:
        raise AssertionError(f"grid too coarse for {quant_type}: a bin holds two bounds")
    threshold = torch.full((nbins,), float("inf"), dtype=torch.float32)
    rows, cols = inside.nonzero(as_tuple=True)
    threshold[rows] = bounds[cols]
    code_below = order[below]
    code_above = order[(below + inside.sum(dim=1)).clamp(max=order.numel() - 1)]
    sorted_codes = torch.equal(order, torch.arange(order.numel(), dtype=torch.uint8))
    return code_below, code_above, threshold, sorted_codes


def nearest_codes(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Same result as `nearest_codes_reference` for any finite float32 `scaled`. `(n,)` uint8."""
    code_below, code_above, threshold, sorted_codes = _grid_tables(quant_type)
    if code_below.device != scaled.device:
        code_below, code_above, threshold = (t.to(scaled.device) for t in (code_below, code_above, threshold))
    scaled = scaled.reshape(-1)  # (n,)
    # bin = floor((x + 1) * GRID_HALF). Clamping is exact: the first and last bins hold no
    # bound, so any x below -1 (above 1) gets the lowest (highest) level anyway. NaN is not allowed.
    bins = scaled.mul(GRID_HALF).add_(GRID_HALF).clamp_(0, 2 * GRID_HALF).to(torch.int32)
    above = scaled > threshold.index_select(0, bins)
    if sorted_codes:  # NF4: codes are sorted indices, so "above" adds exactly one
        codes = code_below.index_select(0, bins)
        codes += above
        return codes
    return torch.where(above, code_above.index_select(0, bins), code_below.index_select(0, bins))
