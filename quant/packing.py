"""Two 4-bit codes per byte, in bitsandbytes' order: element 2i in the high nibble."""
from __future__ import annotations

import torch


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (values 0..15) two per byte.

    Args:
        codes: integer tensor of any shape; it is flattened in row-major order.

    Returns:
        `uint8` tensor of shape `((n + 1) // 2,)`: byte i holds code 2i in its high
        nibble and code 2i + 1 in its low nibble (0 when n is odd and 2i + 1 == n).
    """
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    flat = codes.reshape(-1)  # (n,)
    # (a meta tensor has no values to check: it packs to a meta tensor of the right shape)
    if flat.numel() and flat.device.type != "meta" and (int(flat.min()) < 0 or int(flat.max()) > 15):
        raise ValueError("codes must lie in 0..15 to fit in a nibble")
    flat = flat.to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])  # (n + 1,)
    pairs = flat.view(-1, 2)  # (n_bytes, 2): (high, low)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """Inverse of `pack_nibbles`.

    Args:
        packed: `uint8` tensor of any shape (flattened), e.g. bitsandbytes' `(n // 2, 1)`.
        numel: number of codes to return; default `2 * packed.numel()`. Must be
            `2 * packed.numel()` or one less.

    Returns:
        `uint8` tensor of shape `(numel,)` with values 0..15.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 torch.Tensor, got {got}")
    flat = packed.reshape(-1)  # (n_bytes,)
    if numel is None:
        numel = 2 * flat.numel()
    if isinstance(numel, bool) or not isinstance(numel, int):
        raise ValueError(f"numel must be an int or None, got {numel!r}")
    if numel not in (2 * flat.numel(), 2 * flat.numel() - 1) or numel < 0:
        raise ValueError(f"numel={numel} does not fit {flat.numel()} packed bytes "
                         f"(allowed: {2 * flat.numel() - 1} or {2 * flat.numel()})")
    pairs = torch.stack([flat >> 4, flat & 0xF], dim=-1)  # (n_bytes, 2): (high, low)
    return pairs.reshape(-1)[:numel]  # (numel,)
