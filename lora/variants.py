"""LoRA variants: objects a LoRA layer holds per adapter to change what that adapter does.

A plain LoRA adapter adds `scaling * B A x` and merges as `W + scaling * B A`; a variant
(DoRA today) replaces those steps for one adapter. A layer keeps its variants in
`layer.lora_variant[adapter_name]` (adapters without an entry are plain LoRA), and calls
them at four points, the pattern of PEFT's `tuners/lora/variants.py`:

- `init(layer, name)`: create the variant's parameters on the layer (after A and B exist);
- `merge(layer, name, weight)` / `unmerge(layer, name, weight)`: the base weight (a float32
  or float64 copy, in the base layer's layout) with the adapter merged in / taken out;
- `forward(layer, name, x, result, base_out)`: the output with the adapter's contribution
  added, given the input x, the output so far and the base layer's own output.

Variants only use the layer through its public pieces (`lora_A`, `lora_B`, `scaling`,
`lora_dropout`, `base_layer`, `weight_out_in()`), so this module imports nothing from
`lora.layer` and any layer type can hold them.
"""
from __future__ import annotations

import torch
from torch import nn

from .dora import factored_row_norm, weight_row_sq_norm


class LoraVariant:
    """The interface; see the module docstring. Subclasses override all four steps."""

    def init(self, layer: nn.Module, adapter_name: str) -> None:
        raise NotImplementedError

    def merge(self, layer: nn.Module, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unmerge(self, layer: nn.Module, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, layer: nn.Module, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def base_weight_changed(self) -> None:
        """Forget anything derived from the base weight or kept by a merge (called after the layer
        rewrote the weight itself, e.g. restored its pre-merge copy)."""


def dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """`m / ||W + s B A||_row`, with 1 where the row norm is 0: such a row of `W + s B A` is
    all zeros, so any finite scale gives the same (zero) contribution, while m / 0 would put
    NaN (0 / 0) or inf into the output and the merged weight."""
    return torch.where(norm > 0, magnitude / torch.where(norm > 0, norm, torch.ones_like(norm)),
                       torch.ones_like(magnitude))


class DoraMagnitude(nn.Module):
    """DoRA's magnitude vector m, one entry per output row (DoRA sec. 4.1); PEFT's
    `lora_magnitude_vector[name]`, so its file key is `...lora_magnitude_vector.weight`."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class DoraLinearVariant(LoraVariant):
    """DoRA (Liu et al. 2024) for a linear layer: `W' = (m / ||W + s B A||_row) (W + s B A)`
    (DoRA eq. 5), the norm detached from the graph (DoRA sec. 4.3).

    The layer provides `weight_out_in()` (its base weight as (out, in), detached) and
    `lora_magnitude_vector` (a ModuleDict where `init` puts m). The variant keeps
    `||W||_row^2` cached (W is frozen) and, while merged, the row norms merge used.
    """

    def __init__(self):
        self._w_sq_cache: tuple | None = None  # (key of W, ||W||_row^2)
        self._merge_norm: torch.Tensor | None = None  # row norms used by merge, for unmerge

    def init(self, layer, adapter_name: str) -> None:
        """m = ||W + s B A||_row (`||W||_row` for a fresh adapter, so the layer still equals its base)."""
        weight = layer.weight_out_in()
        A = layer.lora_A[adapter_name].weight
        with torch.no_grad():
            norm = self.row_norm(layer, adapter_name)
        layer.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm.to(A.dtype).to(weight.device))

    def base_weight_changed(self) -> None:
        self._w_sq_cache = None
        self._merge_norm = None

    def _weight_sq_norm(self, layer) -> torch.Tensor:
        """Cached `||W||_row^2`; recomputed when W changes (merge, or an in-place edit)."""
        weight = layer.weight_out_in()
        key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        if self._w_sq_cache is None or self._w_sq_cache[0] != key:
            self._w_sq_cache = (key, weight_row_sq_norm(weight))
        return self._w_sq_cache[1]

    def row_norm(self, layer, adapter_name: str) -> torch.Tensor:
        """`||W + s B A||_row` (out,), by the expanded square with `||W||_row^2` cached (`lora.dora`)."""
        A = layer.lora_A[adapter_name].weight.detach()
        B = layer.lora_B[adapter_name].weight.detach()
        return factored_row_norm(layer.weight_out_in(), A, B, layer.scaling[adapter_name],
                                 w_sq=self._weight_sq_norm(layer))

    def _magnitude(self, layer, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        return layer.lora_magnitude_vector[adapter_name].weight.detach().to(dtype)

    def merge(self, layer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """`(m / ||W + delta||_row) * (W + delta)`, the row norms kept for `unmerge`."""
        self._w_sq_cache = None
        t = layer.fan_in_fan_out
        W = weight.T if t else weight  # (out, in)
        delta = layer.get_delta_weight(adapter_name).to(weight.dtype)
        combined = W + (delta.T if t else delta)  # (out, in)
        norm = torch.linalg.vector_norm(combined, dim=1)  # (out,)
        self._merge_norm = norm
        out = dora_scale(self._magnitude(layer, adapter_name, weight.dtype), norm)[:, None] * combined
        return out.T if t else out

    def unmerge(self, layer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `merge`: `W' / (m / n) - delta` with the row norms n merge used."""
        self._w_sq_cache = None
        t = layer.fan_in_fan_out
        W = weight.T if t else weight  # (out, in)
        norm, self._merge_norm = self._merge_norm.to(weight.dtype), None
        delta = layer.get_delta_weight(adapter_name).to(weight.dtype)
        delta = delta.T if t else delta  # (out, in)
        out = (1 / dora_scale(self._magnitude(layer, adapter_name, weight.dtype), norm))[:, None] * W - delta
        return out.T if t else out

    def forward(self, layer, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor) -> torch.Tensor:
        """`result + (m/n - 1) * W x + (m/n) * s * B A dropout(x)` (N, out), n = row norm
        detached (DoRA sec. 4.3); `base_out` = W x + b, x is (N, in)."""
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        with torch.no_grad():
            norm = self.row_norm(layer, adapter_name)  # (out,)
        mag = layer.lora_magnitude_vector[adapter_name].weight
        scale = dora_scale(mag, norm.to(mag.dtype))  # (out,)
        bias = getattr(layer.base_layer, "bias", None)
        wx = base_out if bias is None else base_out - bias  # (N, out): W x without the bias
        lora = B(A(layer.lora_dropout[adapter_name](x.to(A.weight.dtype)))) * layer.scaling[adapter_name]  # (N, out)
        return result + ((scale - 1) * wx.to(scale.dtype) + scale * lora).to(result.dtype)


class DoraConvVariant(DoraLinearVariant):
    """DoRA for a convolution (groups = 1), PEFT's parameterisation: the norm is taken per
    output channel over the whole kernel, `||W + s delta||` over (in, *k), and m is stored as
    (1, out, 1, ...) (PEFT's `lora_magnitude_vector` shape, so files line up).

    The layer's `weight_out_in()` is the kernel flattened to (out, in * prod(k)); A flattened
    is (r, in * prod(k)) and B (out, r), so the linear variant's factored row norm applies.
    """

    def row_norm(self, layer, adapter_name: str) -> torch.Tensor:
        A = layer.lora_A[adapter_name].weight.detach()
        B = layer.lora_B[adapter_name].weight.detach()
        r = A.shape[0]
        return factored_row_norm(layer.weight_out_in(), A.reshape(r, -1), B.reshape(-1, r),
                                 layer.scaling[adapter_name], w_sq=self._weight_sq_norm(layer))

    def init(self, layer, adapter_name: str) -> None:
        weight = layer.weight_out_in()
        A = layer.lora_A[adapter_name].weight
        with torch.no_grad():
            norm = self.row_norm(layer, adapter_name)  # (out,)
        view = (1, -1) + (1,) * layer.kernel_dim  # PEFT's (1, out, 1, ...)
        layer.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm.to(A.dtype).to(weight.device).reshape(view))

    @staticmethod
    def _channel_view(layer, t: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector as (out, *1) to broadcast over an output (N, out, *spatial)."""
        return t.reshape((-1,) + (1,) * layer.kernel_dim)

    @staticmethod
    def _kernel_view(layer, t: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector as (out, 1, *1) to broadcast over a kernel (out, in, *k)."""
        return t.reshape((-1,) + (1,) * (layer.kernel_dim + 1))

    def _magnitude(self, layer, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        return super()._magnitude(layer, adapter_name, dtype).reshape(-1)  # (out,)

    def merge(self, layer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """`(m / ||W + delta||_channel) * (W + delta)`, the norms kept for `unmerge`."""
        self._w_sq_cache = None
        combined = weight + layer.get_delta_weight(adapter_name).to(weight.dtype)  # (out, in, *k)
        norm = torch.linalg.vector_norm(combined.reshape(combined.shape[0], -1), dim=1)  # (out,)
        self._merge_norm = norm
        scale = dora_scale(self._magnitude(layer, adapter_name, weight.dtype), norm)
        return self._kernel_view(layer, scale) * combined

    def unmerge(self, layer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        self._w_sq_cache = None
        norm, self._merge_norm = self._merge_norm.to(weight.dtype), None
        scale = dora_scale(self._magnitude(layer, adapter_name, weight.dtype), norm)
        return weight / self._kernel_view(layer, scale) - layer.get_delta_weight(adapter_name).to(weight.dtype)

    def forward(self, layer, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor) -> torch.Tensor:
        """`result + (m/n - 1) * conv(x, W) + (m/n) * s * B(A(dropout(x)))`, per output channel."""
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        with torch.no_grad():
            norm = self.row_norm(layer, adapter_name)  # (out,)
        mag = layer.lora_magnitude_vector[adapter_name].weight.reshape(-1)  # (out,)
        scale = self._channel_view(layer, dora_scale(mag, norm.to(mag.dtype)))  # (out, 1, ...)
        bias = getattr(layer.base_layer, "bias", None)
        wx = base_out if bias is None else base_out - self._channel_view(layer, bias)  # conv(x, W), no bias
        lora = B(A(layer.lora_dropout[adapter_name](x.to(A.weight.dtype)))) * layer.scaling[adapter_name]
        return result + ((scale - 1) * wx.to(scale.dtype) + scale * lora).to(result.dtype)


class DoraEmbeddingVariant(DoraLinearVariant):
    """DoRA for an embedding, PEFT's parameterisation. The table E (num, dim) is the weight of
    a linear map from one-hot token ids, `W = E^T` (dim, num), so m and the norms are per
    embedding dimension: `n_j = ||E[:, j] + s (B A)^T[:, j]||` over all tokens, and
    `E' = (E + s (B A)^T) * (m / n)` column-wise. With A (r, num) and B (dim, r) this is the
    linear variant's layout, whose factored norm and cached `||W||_row^2` apply unchanged.
    """

    def row_norm(self, layer, adapter_name: str) -> torch.Tensor:
        A = layer.lora_embedding_A[adapter_name].detach()  # (r, num)
        B = layer.lora_embedding_B[adapter_name].detach()  # (dim, r)
        return factored_row_norm(layer.weight_out_in(), A, B, layer.scaling[adapter_name],
                                 w_sq=self._weight_sq_norm(layer))

    def init(self, layer, adapter_name: str) -> None:
        weight = layer.weight_out_in()
        A = layer.lora_embedding_A[adapter_name]
        with torch.no_grad():
            norm = self.row_norm(layer, adapter_name)  # (dim,)
        layer.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm.to(A.dtype).to(weight.device))

    def merge(self, layer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """`(E + delta) * (m / n)` per column (embedding dimension), the norms kept for `unmerge`."""
        self._w_sq_cache = None
        combined = weight + layer.get_delta_weight(adapter_name).to(weight.dtype)  # (num, dim)
        norm = torch.linalg.vector_norm(combined, dim=0)  # (dim,)
        self._merge_norm = norm
        return combined * dora_scale(self._magnitude(layer, adapter_name, weight.dtype), norm)[None, :]

    def unmerge(self, layer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        self._w_sq_cache = None
        norm, self._merge_norm = self._merge_norm.to(weight.dtype), None
        scale = dora_scale(self._magnitude(layer, adapter_name, weight.dtype), norm)
        return weight / scale[None, :] - layer.get_delta_weight(adapter_name).to(weight.dtype)

    def forward(self, layer, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor) -> torch.Tensor:
        """`result + (m/n - 1) * E[x] + (m/n) * s * A^T[x] B^T` (..., dim); x holds token ids."""
        A, B = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
        with torch.no_grad():
            norm = self.row_norm(layer, adapter_name)  # (dim,)
        mag = layer.lora_magnitude_vector[adapter_name].weight
        scale = dora_scale(mag, norm.to(mag.dtype))  # (dim,)
        lora = (layer.embed(x, A.T) * layer.scaling[adapter_name]) @ B.T  # (..., dim)
        return result + ((scale - 1) * base_out.to(scale.dtype) + scale * lora).to(result.dtype)
