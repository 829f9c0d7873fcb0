"""Train only some rows of an embedding (PEFT's `trainable_token_indices` / `TrainableTokens`).

Adding a few new tokens to a vocabulary (chat markers, tool-call tags) needs their
embedding rows trained, not the whole (vocab, dim) matrix and not a low-rank update of
it. Each adapter holds its own copy of the chosen rows (`trainable_tokens_delta`, which,
despite PEFT's name, holds the new row values, not differences) and the originals; the
forward swaps them into the weight with `index_copy`, so gradients reach only those rows.

Layout and file keys follow PEFT (`<embedding>.token_adapter.trainable_tokens_delta`),
and an output head tied to the embedding (`head.weight is embed.weight`) is wrapped too,
sharing the rows, so input and output see the same token vectors, as PEFT does.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_adapter_name


def check_token_indices(indices, num_rows: int, name: str = "trainable_token_indices") -> list[int]:
    """A non-empty list of distinct ints in [0, num_rows), else TypeError/ValueError naming `name`."""
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise TypeError(f"{name} must be a list of token ids (ints), got {type(indices).__name__}")
    out = list(indices)
    if not out:
        raise ValueError(f"{name} must name at least one token id, got an empty list")
    bad = [i for i in out if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_rows]
    if bad:
        raise ValueError(f"{name} must be ints in [0, {num_rows}) (the rows of the embedding), got {bad[:8]}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} lists a token id twice: {sorted(i for i in set(out) if out.count(i) > 1)}")
    return out


class TokenRows(nn.Module):
    """The per-adapter rows of one weight: `trainable_tokens_delta[name]` (k, dim), the
    original rows `trainable_tokens_original[name]` and the ids `token_indices[name]`."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = nn.ParameterDict()
        self.trainable_tokens_original: dict[str, torch.Tensor] = {}
        self.token_indices: dict[str, list[int]] = {}

    def add(self, adapter_name: str, indices: list[int]) -> None:
        weight = self.base_layer.weight
        rows = weight.detach()[torch.tensor(indices, device=weight.device)]  # (k, dim)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(rows.clone())
        self.trainable_tokens_original[adapter_name] = rows.clone()
        self.token_indices[adapter_name] = list(indices)

    def weight_with(self, names: list[str]) -> torch.Tensor:
        """The base weight with the rows of `names` swapped in (differentiable in the rows)."""
        weight = self.base_layer.weight
        for name in names:
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight.dtype))
        return weight


class TrainableTokens(nn.Module):
    """Wrap an `nn.Embedding` (or an `nn.Linear` head tied to one, via `tied_to`) so
    that only the rows `token_indices` of each adapter are trained."""

    def __init__(self, base_layer: nn.Module, token_indices: Iterable[int] | None = None, *,
                 adapter_name: str = "default", tied_to: "TrainableTokens | None" = None):
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise TypeError(f"base_layer must be an nn.Embedding (or an nn.Linear head tied to one), "
                            f"got {type(base_layer).__name__}")
        if tied_to is not None:
            if not isinstance(tied_to, TrainableTokens) or tied_to.weight is not base_layer.weight:
                raise ValueError("tied_to must be the TrainableTokens of a layer holding this layer's weight "
                                 "(an output head tied to its input embedding)")
            if token_indices is not None:
                raise ValueError("a tied layer trains the rows of the layer it is tied to; give no token_indices")
            self._tied = [tied_to]  # a list: not registered as a submodule (the embedding owns the rows)
        else:
            if token_indices is None:
                raise ValueError("token_indices is required (the rows to train)")
            self._tied = []
            self.token_adapter = TokenRows(base_layer)
        self.base_layer = base_layer
        self._active: list[str] = []
        self.disabled = False
        base_layer.weight.requires_grad_(False)
        if tied_to is None:
            self.add_adapter(adapter_name, token_indices)

    @property
    def rows(self) -> TokenRows:
        return self._tied[0].rows if self._tied else self.token_adapter

    @property
    def active_adapters(self) -> list[str]:
        """A tied head follows the embedding's adapters."""
        return self._tied[0].active_adapters if self._tied else self._active

    @property
    def is_disabled(self) -> bool:
        return self.disabled or (bool(self._tied) and self._tied[0].disabled)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.rows.token_indices)

    def add_adapter(self, adapter_name: str, token_indices: Iterable[int], activate: bool | None = None) -> None:
        if self._tied:
            raise ValueError("this layer shares its rows with the embedding it is tied to; add adapters there")
        check_adapter_name(adapter_name)
        if adapter_name in self.rows.token_indices:
            raise ValueError(f"adapter_name {adapter_name!r} already exists on this layer")
        indices = check_token_indices(token_indices, self.base_layer.weight.shape[0])
        self.rows.add(adapter_name, indices)
        if activate or (activate is None and not self.active_adapters):
            self.set_adapter([adapter_name])

    def check_adapter_names(self, adapter_names: str | list[str]) -> list[str]:
        """The names as a list, if this layer can activate them together (else ValueError);
        an empty list runs the base alone."""
        if self._tied:
            raise ValueError("this layer follows the adapters of the embedding it is tied to; set them there")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.rows.token_indices]
        if unknown:
            raise ValueError(f"adapter_names {unknown} not found; this layer has {self.adapter_names}")
        seen: set[int] = set()
        for n in names:  # the same row from two adapters has no defined value (PEFT refuses too)
            overlap = seen & set(self.rows.token_indices[n])
            if overlap:
                raise ValueError(f"adapter_names {names}: token ids {sorted(overlap)[:8]} are trained by more "
                                 "than one of them; activate adapters with disjoint token_indices")
            seen |= set(self.rows.token_indices[n])
        return names

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        names = self.check_adapter_names(adapter_names)
        self._active = names
        for n, p in self.rows.trainable_tokens_delta.items():
            p.requires_grad_(n in names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop one adapter's rows (a tied layer follows its embedding: nothing to do there)."""
        if self._tied:
            return
        if adapter_name not in self.rows.token_indices:
            raise ValueError(f"adapter_name {adapter_name!r} not found; this layer has {self.adapter_names}")
        del self.rows.trainable_tokens_delta[adapter_name]
        del self.rows.trainable_tokens_original[adapter_name]
        del self.rows.token_indices[adapter_name]
        self._active = [n for n in self._active if n != adapter_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = [] if self.is_disabled else self.active_adapters
        if not names:
            return self.base_layer(x)
        weight = self.rows.weight_with(names)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)
        return F.linear(x, weight.to(x.dtype), None if base.bias is None else base.bias.to(x.dtype))

    def merged_base(self) -> nn.Module:
        """The base layer with the active adapters' rows written into its weight (in place)."""
        with torch.no_grad():
            self.base_layer.weight.copy_(self.rows.weight_with(self.active_adapters))
        return self.base_layer

    # PEFT-like attribute access, so code reading `embed.weight` / `num_embeddings` works
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("num_embeddings", "embedding_dim", "padding_idx", "in_features", "out_features"):
                return getattr(self._modules["base_layer"], name)
            raise
