"""Checks on what an adapter folder holds, before anything of it reaches a model.

`parse_json_object` reads untrusted JSON; `check_values` refuses non-float or non-finite
adapter weights; `check_fit` compares a file's tensors with the model's, key by key;
`copy_into` then copies them (only after every check has passed).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

MAX_JSON_DEPTH = 32  # PEFT configs nest 3 levels; deep nesting would only reach Python's recursion limit


def _refuse_constant(token: str):
    raise ValueError(f"non-finite number {token} is not allowed")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # e.g. 1e999 parses as inf
        raise ValueError(f"number {token} does not fit a float (overflows to {value})")
    return value


def _no_duplicate_keys(pairs: list) -> dict:
    """A JSON object that names one key twice is ambiguous (json keeps the last silently)."""
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"keys {repeated} appear more than once")
    return dict(pairs)


def _depth(value) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json_object(data: bytes, source: str) -> dict:
    """`json.loads` for untrusted bytes: one JSON object of finite numbers, at most
    MAX_JSON_DEPTH deep; anything else is a ValueError naming `source`."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float,
                           object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ValueError(f"{source}: JSON nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity, huge ints
        raise ValueError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(value).__name__}")
    if _depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _is_adapter_key(key: str) -> bool:
    """A key that holds adapter weights proper (not a modules_to_save buffer, which may be an int)."""
    return "lora_" in key or ".adapter." in key or key == "prompt_embeddings" or key.endswith("base_layer.bias")


def _all_finite(t: torch.Tensor) -> bool:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.float()  # e.g. float8, which has no isfinite kernel everywhere
    return bool(torch.isfinite(t).all())


def check_values(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Adapter weights are floating point and finite: an int8 / bool tensor or a NaN would
    load into the float parameters without complaint and give wrong outputs."""
    for key, t in tensors.items():
        if t.is_floating_point():
            if not _all_finite(t):
                raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values")
        elif _is_adapter_key(key):
            raise ValueError(f"{path}: tensor {key!r} has dtype {t.dtype}; adapter weights must be floating point")


def strip_keys(raw: dict[str, torch.Tensor], path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """File keys without `prefix`; DoRA magnitudes by PEFT's key (`...lora_magnitude_vector`, also
    accepted as `....weight`). Two file keys that name the same tensor are refused."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        short = key[len(prefix):] if key.startswith(prefix) else key
        short = short[:-len(".weight")] if short.endswith("lora_magnitude_vector.weight") else short
        if short in tensors:
            raise ValueError(f"{path}: two tensors are stored for {short!r} (with and without {prefix!r})")
        tensors[short] = value
    return tensors


def check_fit(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], directory: Path) -> None:
    """The file has exactly the model's keys, with their shapes and a dtype that copies losslessly in kind."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    common = sorted(set(expected) & set(found))
    wrong = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in common if found[k].shape != expected[k].shape]
    dtypes = [f"{k}: file {found[k].dtype} vs model {expected[k].dtype}" for k in common
              if (found[k].dtype != expected[k].dtype
                  and not (found[k].is_floating_point() and expected[k].is_floating_point()))]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong shapes {wrong}")
    if dtypes:
        problems.append(f"wrong dtypes {dtypes}")
    if problems:
        raise ValueError(f"adapter in {directory} does not fit the model: " + "; ".join(problems))


def copy_into(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(found[key])
