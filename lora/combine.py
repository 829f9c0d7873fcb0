"""Combine LoRA adapters exactly: `delta = sum_i w_i * s_i * B_i A_i`.

Averaging the factors (`B = sum w_i B_i`, `A = sum w_i A_i`) adds cross terms
`w_i w_j B_i A_j` that belong to no adapter (PEFT issues 3004 and 1155). Stacking them
instead is exact: `delta = [w_1 s_1 B_1, ..., w_n s_n B_n] @ [A_1; ...; A_n]`, a rank
`sum r_i` adapter with scaling 1. With a target rank r the stacked product is truncated
by its SVD, which is the best rank-r approximation in the Frobenius norm (Eckart-Young);
the SVD is taken of a small (R, R) core after two thin QRs (R = sum r_i), never of the
(out, in) matrix.
"""
from __future__ import annotations

import copy
import math
import re

import torch

from .config import check_adapter_name, check_rank
from .inject import lora_layers
from .layer import LoRAEmbedding, LoRALayer, LoRALinear
from .model_state import lora_configs

_FACTORS = {LoRALinear: ("lora_A", "lora_B"), LoRAEmbedding: ("lora_embedding_A", "lora_embedding_B")}


def _factor_names(layer: LoRALayer) -> tuple[str, str]:
    for cls, names in _FACTORS.items():
        if isinstance(layer, cls):
            return names
    raise TypeError(f"combine_adapters supports LoRALinear and LoRAEmbedding layers, got {type(layer).__name__}")


def get_factors(layer: LoRALayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) of one adapter, float64; `delta = scaling * B @ A` ((B A)^T for embeddings)."""
    a_name, b_name = _factor_names(layer)
    if name not in layer.r:
        raise ValueError(f"name: adapter {name!r} is not on this layer; it has {sorted(layer.r)}")
    A, B = getattr(layer, a_name)[name], getattr(layer, b_name)[name]
    A = A if isinstance(A, torch.Tensor) else A.weight
    B = B if isinstance(B, torch.Tensor) else B.weight
    return A.detach().double(), B.detach().double()


def _set_factors(layer: LoRALayer, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    a_name, b_name = _factor_names(layer)
    for container_name, value in ((a_name, A), (b_name, B)):
        target = getattr(layer, container_name)[name]
        target = target if isinstance(target, torch.Tensor) else target.weight
        with torch.no_grad():
            target.copy_(value.to(target.dtype))


def truncate(Bc: torch.Tensor, Ac: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-r factors of `Bc @ Ac` ((out, R) @ (R, in)) and the relative Frobenius error.

    Returns (A (r, in), B (out, r), ||Bc Ac - B A|| / ||Bc Ac||); singular values are
    split evenly (sqrt on each side), zero-padded when the product has rank below r.
    """
    Qb, Rb = torch.linalg.qr(Bc)  # (out, kb), (kb, R)
    Qa, Ra = torch.linalg.qr(Ac.T)  # (in, ka), (ka, R)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # core (kb, ka): Bc Ac = Qb U S Vh Qa^T
    k = min(r, S.numel())
    root = S[:k].sqrt()
    B = torch.zeros(Bc.shape[0], r, dtype=Bc.dtype)
    A = torch.zeros(r, Ac.shape[1], dtype=Ac.dtype)
    B[:, :k] = (Qb @ U[:, :k]) * root  # (out, k)
    A[:k] = root[:, None] * (Vh[:k] @ Qa.T)  # (k, in)
    total = S.square().sum().item()
    error = math.sqrt(S[k:].square().sum().item() / total) if total > 0 else 0.0
    return A, B, error


def _check_weights(model, weights) -> list[str]:
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"weights must be a non-empty dict {{adapter name: weight}}, got {weights!r}")
    known = set(lora_configs(model))
    for _, layer in lora_layers(model):
        known |= set(layer.r)
    for key, w in weights.items():
        check_adapter_name(key, "weights key")
        if key not in known:
            raise ValueError(f"weights: adapter {key!r} not found; the model has {sorted(known)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights[{key!r}] must be a finite number, got {w!r}")
    return list(weights)


# Config fields whose trained tensors are not a scaling * B @ A term of a LoRA layer.
_NOT_LOW_RANK = ("modules_to_save", "trainable_token_indices", "target_parameters")


def combine_adapters(model: torch.nn.Module, weights: dict[str, float], name: str = "mix",
                     r: int | None = None) -> dict[str, float]:
    """Add adapter `name` whose update is exactly `sum_i weights[i] * scaling_i * B_i A_i` on every layer.

    Args:
        model: a model with LoRA adapters (`apply_lora` / `load_adapter`).
        weights: {adapter name: finite weight}; negative weights subtract an update (task negation).
            DoRA adapters are refused (their update is not low-rank).
        name: the new adapter (added inactive; `set_adapter(model, name)` to use it).
        r: target rank; None keeps every direction (rank `sum r_i`, exact), an int truncates by SVD.

    Returns:
        {layer path: relative Frobenius error of the truncation} (0.0 everywhere when exact).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = _check_weights(model, weights)
    check_adapter_name(name, "name")
    configs = lora_configs(model)
    extras = {n: [f for f in _NOT_LOW_RANK if getattr(configs[n], f, None)] for n in names if n in configs}
    extras = {n: fields for n, fields in extras.items() if fields}
    if extras:
        raise ValueError(f"weights: adapters {extras} (adapter: fields) also train whole modules, embedding rows "
                         "or raw parameters, which are not low-rank updates and have no weighted sum here; "
                         "combine adapters without them")
    if r is not None:
        check_rank(r)
    layers = [(p, layer) for p, layer in lora_layers(model) if any(n in layer.r for n in names)]
    if not layers:
        raise ValueError(f"weights: adapters {names} are on no LoRA layer of this model; nothing to combine")
    variants = [p for p, layer in layers if any(n in layer.lora_variant for n in names)]
    if variants:
        raise ValueError(f"combine_adapters cannot combine DoRA adapters (layers {variants[:5]}): a DoRA update "
                         "rescales rows of W + s B A and is not a sum of low-rank terms")
    biased = [p for p, layer in layers if any(n in layer.r and layer.lora_bias_of(n) is not None for n in names)]
    if biased:
        raise ValueError(f"combine_adapters cannot combine adapters with lora_bias (layers {biased[:5]}): their "
                         "update scaling * (B A x + b) has a bias term that a B @ A factor cannot hold")
    taken = [p for p, layer in layers if name in layer.r]
    if taken or name in lora_configs(model):
        raise ValueError(f"name {name!r} is already an adapter of this model; choose another name")
    for _, layer in layers:
        _factor_names(layer)  # unsupported layer types fail before anything is added
    # Every new factor is computed (and checked) before the first layer changes.
    combined = {path: _combined_factors(path, layer, names, weights, r) for path, layer in layers}
    for path, layer in layers:
        A_new, B_new, _ = combined[path]
        first = next(n for n in names if n in layer.r)
        dtype = _factor_dtype(layer, first)
        rank = A_new.shape[0]
        layer.add_adapter(name, r=rank, alpha=rank, dtype=dtype, activate=False)  # scaling = alpha / r = 1
        _set_factors(layer, name, A_new, B_new)
    _register_config(model, names, name, r, {path: c[0].shape[0] for path, c in combined.items()})
    return {path: c[2] for path, c in combined.items()}


def _factor_dtype(layer: LoRALayer, name: str) -> torch.dtype:
    """The dtype of one adapter's factors (the combined adapter gets the same)."""
    a_name, _ = _factor_names(layer)
    A = getattr(layer, a_name)[name]
    return (A if isinstance(A, torch.Tensor) else A.weight).dtype


def _combined_factors(path: str, layer: LoRALayer, names: list[str], weights: dict[str, float],
                      r: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative truncation error) of the weighted sum on one layer; ValueError if it overflows."""
    parts = [(get_factors(layer, n), weights[n] * layer.scaling[n]) for n in names if n in layer.r]
    Bc = torch.cat([B * c for (_, B), c in parts], dim=1)  # (out, R)
    Ac = torch.cat([A for (A, _), _ in parts], dim=0)  # (R, in)
    dtype = _factor_dtype(layer, next(n for n in names if n in layer.r))
    _check_finite(path, Bc, dtype, weights)  # before the SVD, which fails on inf
    if r is None or r >= Ac.shape[0]:
        A_new, B_new, error = Ac, Bc, 0.0
    else:
        A_new, B_new, error = truncate(Bc, Ac, r)
    _check_finite(path, A_new, dtype, weights)
    _check_finite(path, B_new, dtype, weights)
    return A_new, B_new, error


def _check_finite(path: str, factor: torch.Tensor, dtype: torch.dtype, weights: dict) -> None:
    if not torch.isfinite(factor.to(dtype)).all():
        raise ValueError(f"weights {weights!r}: the combined update of {path} overflows {dtype} "
                         "(weights too large); nothing was added")


def _register_config(model, names: list[str], name: str, r: int | None, ranks: dict[str, int]) -> None:
    """Record the new adapter's LoRAConfig (so `save_adapter` writes it): scaling 1 on every layer."""
    configs = lora_configs(model)
    if not configs:
        return
    source = next((configs[n] for n in names if n in configs), None)
    if source is None:
        return
    config = copy.deepcopy(source)
    config.r = r if r is not None else max(ranks.values())
    config.alpha, config.rslora, config.dora = config.r, False, False
    config.target_modules = sorted(ranks)
    config.rank_pattern = {re.escape(p): k for p, k in ranks.items() if k != config.r}
    config.alpha_pattern = {re.escape(p): float(k) for p, k in ranks.items() if k != config.r}
    configs[name] = config
