"""Hot swap: replace a loaded adapter's weights in place, so a compiled model keeps its graph.

LoRA sec. 4.2: "quickly switch tasks by swapping A and B". `load_adapter` into an existing
adapter may re-create modules or change Python attributes (rank, scaling), and a
`torch.compile`d model guards on those and recompiles. `hotswap_adapter` instead copies the
new A and B into the existing tensors (`.data` in place): same modules, same shapes, same
Python attributes, so no guard fails.

Semantics (those of PEFT's `hotswap_adapter`, `peft/utils/hotswap.py`):
- a layer of the new adapter with a smaller rank is zero-padded (rows of A, columns of B
  past its rank are zero, so they add nothing);
- a larger rank than the slot is refused (ValueError) unless the slots were padded before
  compiling with `prepare_for_hotswap(model, adapter_name, target_rank)` (PEFT's
  `prepare_model_for_compiled_hotswap`);
- layers carrying the adapter that the new file does not target get zero weights (their
  delta is 0, as in the new adapter); a file key with no such layer is refused.
- the scaling stays a Python float that the compiled graph holds as a constant, so a new
  scaling `s'` is folded into B: the slot holds `B' * s' / s` (PEFT turns the scalings into
  tensors instead). That is one extra rounding of B in its dtype (2^-24 relative for
  float32 adapters, 2^-8 for bfloat16); when `s' == s` the copy is exact.
Merged adapters and DoRA adapters are refused. Everything is checked before any tensor is
written.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from .config import LoRAConfig, check_adapter_name, check_positive_int, rewrites_base, scaling_for

# (A key suffix, B key suffix) in adapter files (PEFT's names)
KEYS = {"linear": ("lora_A.weight", "lora_B.weight"), "embedding": ("lora_embedding_A", "lora_embedding_B")}


def _slot_tensors(layer, name: str) -> tuple[tuple[str, str], torch.Tensor, torch.Tensor]:
    if hasattr(layer, "lora_embedding_A"):
        return KEYS["embedding"], layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return KEYS["linear"], layer.lora_A[name].weight, layer.lora_B[name].weight


def _carriers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    from .inject import lora_layers

    layers = [(p, layer) for p, layer in lora_layers(model) if adapter_name in layer.r]
    if not layers:
        raise ValueError(f"adapter_name {adapter_name!r} is not loaded in this model; load_adapter() it first "
                         "(hot swap replaces the weights of an adapter that is already there)")
    for path, layer in layers:
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into {path}; unmerge() before hot swapping")
        if adapter_name in getattr(layer, "lora_variant", {}):
            raise ValueError(f"adapter {adapter_name!r} of {path} is a DoRA (variant) adapter; hot swap supports "
                             "plain LoRA adapters")
        if type(layer).__name__ == "LoRAParameter":  # rows are r x experts: the rank rules do not apply
            raise ValueError(f"adapter {adapter_name!r} of {path} adapts a raw parameter (target_parameters); "
                             "hot swap supports LoRA on layers (linear, embedding, conv)")
        if layer.lora_bias_of(adapter_name) is not None:
            raise ValueError(f"adapter {adapter_name!r} of {path} has a lora_bias; hot swap supports adapters "
                             "without one")
    return layers


def _plan(model, adapter_name: str, config: LoRAConfig, tensors: dict[str, torch.Tensor]) -> list:
    """[(A slot, B slot, new A or None, new B or None, factor)] after checking everything."""
    if config.dora:
        raise ValueError("the new adapter is a DoRA adapter; hot swap supports plain LoRA adapters")
    if getattr(config, "lora_bias", False):
        raise ValueError("the new adapter has a lora_bias; hot swap supports adapters without one")
    if rewrites_base(config.init):
        raise ValueError(f"the new adapter was trained on a base rewritten by init={config.init!r}; hot swap "
                         "never rewrites the base, so it refuses such adapters")
    layers = _carriers(model, adapter_name)
    plan, used = [], set()
    for path, layer in layers:
        (ka, kb), A, B = _slot_tensors(layer, adapter_name)
        key_a, key_b = f"{path}.{ka}", f"{path}.{kb}"
        if key_a not in tensors and key_b not in tensors:
            plan.append((A, B, None, None, 1.0))  # not targeted by the new adapter: zero delta
            continue
        if key_a not in tensors or key_b not in tensors:
            raise ValueError(f"the new adapter has only one of {key_a!r} and {key_b!r}")
        new_a, new_b = tensors[key_a], tensors[key_b]
        used.update((key_a, key_b))
        r_new = new_a.shape[0]
        if new_a.dim() != 2 or new_b.dim() != 2 or new_b.shape[1] != r_new \
                or new_a.shape[1] != A.shape[1] or new_b.shape[0] != B.shape[0]:
            raise ValueError(f"{path}: new A {tuple(new_a.shape)} and B {tuple(new_b.shape)} do not fit the slot "
                             f"A {tuple(A.shape)}, B {tuple(B.shape)} (same features, rank <= slot rank)")
        if r_new > A.shape[0]:
            raise ValueError(f"{path}: the new adapter has rank {r_new} but the slot of {adapter_name!r} has rank "
                             f"{A.shape[0]}; call prepare_for_hotswap(model, {adapter_name!r}, target_rank="
                             f"{r_new} or more) before compiling")
        r_cfg, alpha = config.rank_and_alpha(path)
        if r_cfg != r_new:
            raise ValueError(f"{path}: the file's config gives rank {r_cfg} but its tensors have rank {r_new}")
        if hasattr(layer, "lora_dropout"):
            p_slot = getattr(layer.lora_dropout[adapter_name], "p", 0.0)  # nn.Identity: no dropout
            if p_slot != config.dropout:
                raise ValueError(f"{path}: the new adapter's dropout {config.dropout} differs from the slot's "
                                 f"{p_slot} (changing it would recompile); load_adapter() instead")
        factor = scaling_for(r_new, alpha, config.rslora) / layer.scaling[adapter_name]
        plan.append((A, B, new_a, new_b, factor))
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"the new adapter has tensors for layers that do not carry {adapter_name!r} (or that "
                         f"hot swap cannot write): {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return plan


@torch.no_grad()
def hotswap_adapter_from_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], config: LoRAConfig,
                                 adapter_name: str = "default") -> None:
    """Hot swap from file-layout tensors (keys `<layer path>.lora_A.weight`, ... without
    PEFT's `base_model.model.` prefix) and the new adapter's `LoRAConfig`."""
    check_adapter_name(adapter_name)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    plan = _plan(model, adapter_name, config, tensors)
    # In place on the parameters themselves (not `.data`): their version counters move, so
    # caches keyed on them (lora.mixed_batch's kernel stacks) see the new weights.
    for A, B, new_a, new_b, factor in plan:
        A.zero_()
        B.zero_()
        if new_a is None:
            continue
        r_new = new_a.shape[0]
        A[:r_new].copy_(new_a.to(A.device, A.dtype))
        new_b = new_b.to(B.device, torch.float64 if B.dtype == torch.float64 else torch.float32)
        B[:, :r_new].copy_(new_b if factor == 1.0 else new_b * factor)


def hotswap_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Replace the weights of loaded adapter `adapter_name` by those of the adapter folder
    `directory` (ours or PEFT's), in place; see the module docstring for the rules."""
    from .files import read_adapter

    check_adapter_name(adapter_name)
    config, tensors = read_adapter(directory)
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"{directory} holds a {type(config).__name__} adapter; hot swap supports LoRA adapters")
    hotswap_adapter_from_tensors(model, tensors, config, adapter_name)


@torch.no_grad()
def prepare_for_hotswap(model: nn.Module, adapter_name: str = "default", target_rank: int = 64) -> None:
    """Zero-pad adapter `adapter_name` to rank `target_rank` in every layer (call before
    `torch.compile`), so adapters up to that rank can be hot swapped in later. The output
    does not change: the new rows of A and columns of B are zero, and the scaling is kept
    (`alpha` is set so that `scaling_for(target_rank, alpha, rslora)` gives it back)."""
    check_positive_int(target_rank, "target_rank")
    layers = _carriers(model, adapter_name)
    for path, layer in layers:
        if layer.r[adapter_name] > target_rank:
            raise ValueError(f"target_rank {target_rank} is below the rank {layer.r[adapter_name]} of "
                             f"{adapter_name!r} in {path}")
    for _, layer in layers:
        _pad(layer, adapter_name, target_rank)


def _pad(layer, name: str, rank: int) -> None:
    old_r, scaling = layer.r[name], layer.scaling[name]
    if old_r == rank:
        return
    _, A, B = _slot_tensors(layer, name)
    new_a = A.new_zeros(rank, A.shape[1])
    new_b = B.new_zeros(B.shape[0], rank)
    new_a[:old_r], new_b[:, :old_r] = A, B
    if hasattr(layer, "lora_embedding_A"):
        layer.lora_embedding_A[name] = nn.Parameter(new_a, requires_grad=A.requires_grad)
        layer.lora_embedding_B[name] = nn.Parameter(new_b, requires_grad=B.requires_grad)
    else:
        la, lb = layer.lora_A[name], layer.lora_B[name]
        la.weight = nn.Parameter(new_a, requires_grad=A.requires_grad)
        lb.weight = nn.Parameter(new_b, requires_grad=B.requires_grad)
        la.out_features, lb.in_features = rank, rank
    rslora = not math.isclose(scaling, layer.alpha[name] / old_r, rel_tol=1e-12)
    layer.r[name] = rank
    layer.alpha[name] = scaling * (math.sqrt(rank) if rslora else rank)
    layer.scaling[name] = scaling  # unchanged (not recomputed: no rounding)
