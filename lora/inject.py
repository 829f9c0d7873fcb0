"""Put LoRA layers into any `nn.Module`, take them out again, and count parameters.

`apply_lora` modifies the model in place (like PEFT's `inject_adapter_in_model`):
each targeted layer is replaced by its LoRA wrapper, chosen by `lora/registry.py`
(extend it with `register_lora_layer`).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from quant import Linear4bit
from quant.module_paths import name_matches, set_submodule

from .config import (
    ALL_LINEAR,
    BIAS_MODES,
    LoRAConfig,
    as_lora_config,
    check_adapter_name,
    check_choice,
    check_flag,
    rewrites_base,
)
from .extra_modules import (
    EXTRA_WRAPPERS,
    activate_extras,
    apply_extras,
    check_set_adapter,
    delete_extras_adapter,
    disable_extras,
    plan_extras,
    restore_disabled,
    set_extras_adapter,
    unload_extras,
)
from .layer import LoRALayer, LoRALinear, adapter_name_list
from .model_state import (
    FAST_PATH_HOOKS,
    LORA_CONFIGS,
    drop_state,
    get_state,
    lora_configs,
    set_state,
)
from .param_wrapper import LoRAParameter
from .registry import (  # noqa: F401  (LORA_LAYER_TYPES, register_lora_layer: public names of lora.inject)
    LINEAR_LIKE_TYPES,
    LORA_LAYER_TYPES,
    is_linear_like,
    register_lora_layer,
    supported_type_names,
    wrapper_for,
)

CONFIG_ATTR = LORA_CONFIGS  # the model attribute {adapter_name: LoRAConfig} (see lora/model_state.py)


def _targets_without(model: nn.Module, names: list[str], feature: str) -> list[str]:
    """"name (base type)" of the targets whose LoRA layer type answers False to the class
    method `feature` (e.g. "supports_dora") for their base, or that no layer type wraps."""
    bad = []
    for name in names:
        module = model.get_submodule(name)
        wrapper = type(module) if isinstance(module, LoRALayer) else wrapper_for(module)
        base = module.base_layer if isinstance(module, LoRALayer) else module
        if wrapper is None or not getattr(wrapper, feature)(base):
            bad.append(f"{name} ({type(base).__name__})")
    return bad


def check_dora_targets(model: nn.Module, names: list[str]) -> None:
    """DoRA needs a layer type with a DoRA variant (`supports_dora`): raise ValueError naming
    the targets that have none, e.g. 4-bit layers (called before the model is touched)."""
    bad = _targets_without(model, names, "supports_dora")
    if bad:
        raise ValueError(f"dora=True needs layers with a dense float weight; these targets are not: {bad} "
                         "(DoRA supports nn.Linear, GPT-2 Conv1D, nn.Embedding and nn.Conv1d/2d/3d with groups=1; "
                         "not 4-bit or attention layers)")


def check_lora_bias_targets(model: nn.Module, names: list[str]) -> None:
    """lora_bias=True needs a layer type whose lora_B takes a bias (`supports_lora_bias`):
    raise ValueError naming the targets that have none (before the model is touched)."""
    bad = _targets_without(model, names, "supports_lora_bias")
    if bad:
        raise ValueError(f"lora_bias=True needs layers whose lora_B takes a bias (linear, 4-bit linear and conv "
                         f"layers, as in PEFT); these targets are not: {bad}. Exclude them (exclude_modules)")


def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """(qualified name, layer) for every LoRA layer in the model (a shared one once, by its first name)."""
    _check_model(model)
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules that could be targeted: not the root, not inside a LoRA layer.

    A module registered under several names (shared) appears once per name."""
    every = list(model.named_modules(remove_duplicate=False))
    inside = [name for name, m in every if isinstance(m, (LoRALayer, *EXTRA_WRAPPERS))]
    return [(name, m) for name, m in every
            if name and not any(name.startswith(p + ".") for p in inside)]


def _paths_by_module(candidates: list[tuple[str, nn.Module]]) -> dict[int, list[str]]:
    """id(module) -> every name it is registered under, first (canonical) name first."""
    paths: dict[int, list[str]] = {}
    for name, m in candidates:
        paths.setdefault(id(m), []).append(name)
    return paths


def check_patterns(config: LoRAConfig) -> None:
    """Regexes (a str target/exclude, rank/alpha pattern keys) must compile, list entries must be
    str: bad ones raise ValueError/TypeError naming the field, not `re.error` mid-way."""
    for field in ("target_modules", "exclude_modules", "modules_to_save"):
        value = getattr(config, field)
        if isinstance(value, str):
            if field == "modules_to_save":
                raise TypeError(f"modules_to_save must be a list of module names, got the str {value!r}")
            if field == "target_modules" and value.lower() == ALL_LINEAR:
                continue
            _compile(value, field)
        elif isinstance(value, list):
            bad = [v for v in value if not isinstance(v, str) or not v]
            if bad:
                raise TypeError(f"{field} must hold non-empty module names (str), got {bad!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field):
            if not isinstance(key, str):
                raise TypeError(f"{field} keys must be regex strings, got {key!r}")
            _compile(key, f"{field} key")


def _compile(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field}={pattern!r} is not a valid regular expression: {err}") from None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s) that "all-linear" leaves out.

    PEFT's rule is `model.get_output_embeddings()` for transformers models; for any other
    module we take, in order: a module named `lm_head`; else a linear layer whose weight is
    the same tensor as an `nn.Embedding` weight (tied embeddings); else the last linear
    layer whose `out_features` equals an embedding's `num_embeddings` (the vocabulary).
    """
    modules = dict(_candidates(model))
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, nn.Module):
        return {n for n, m in modules.items() if m is head}
    named = {n for n in modules if n == "lm_head" or n.endswith(".lm_head")}
    if named:
        return named
    embeddings = [m for m in modules.values() if isinstance(m, nn.Embedding)]
    linears = [(n, m) for n, m in modules.items() if is_linear_like(m)]
    emb_weights = {id(e.weight) for e in embeddings}
    tied = {n for n, m in linears if id(getattr(m, "weight", None)) in emb_weights}
    if tied:
        return tied
    vocab = {e.num_embeddings for e in embeddings}
    vocab_heads = [n for n, m in linears if getattr(m, "out_features", None) in vocab]
    return {vocab_heads[-1]} if vocab_heads else set()


def resolve_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Qualified names of the modules `config` targets, or ValueError listing the candidates."""
    return [group[0] for group in _target_groups(model, config)]


def _target_groups(model: nn.Module, config: LoRAConfig) -> list[list[str]]:
    """One list per targeted module: every name it is registered under (canonical first).

    A module shared under several names is one target: it gets one wrapper, which all its
    names then point to. If one of its names is targeted and another excluded, that is
    ambiguous and raises ValueError naming both."""
    _check_model(model)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    check_patterns(config)
    candidates = _candidates(model)
    wrappable = [n for n, m in candidates if isinstance(m, LoRALayer) or wrapper_for(m) is not None]
    unreachable = _read_without_call(candidates)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        modules = dict(candidates)
        heads = {id(modules[n]) for n in output_head_names(model)}  # by identity: a head has one wrapper
        names = [n for n, m in candidates if is_linear_like(m) and id(m) not in heads and n not in unreachable]
    else:
        names = [n for n, _ in candidates if name_matches(config.target_modules, n) and in_selected_layers(config, n)]
        hit = {n: unreachable[n] for n in names if n in unreachable}
        if hit:
            raise ValueError(f"target_modules={config.target_modules!r} matched {sorted(hit)}, the out_proj of an "
                             "nn.MultiheadAttention: its forward reads out_proj.weight without calling out_proj, "
                             "so a LoRA there would be ignored. Target the attention module itself "
                             f"({sorted(set(hit.values()))}); its LoRA adapts in_proj and out_proj, as in PEFT")
    names = [n for n in names if not name_matches(config.exclude_modules, n)
             and not name_matches(config.modules_to_save, n)]
    if not names:
        shown = ", ".join(wrappable[:60]) + (" ..." if len(wrappable) > 60 else "")
        layers = "" if config.layers_to_transform in (None, []) else \
            f" in layers_to_transform={config.layers_to_transform!r} (layers_pattern={config.layers_pattern!r})"
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of "
                         f"{type(model).__name__}{layers}; candidate module names: [{shown}]")
    modules = dict(candidates)
    bad = [f"{n} ({type(modules[n]).__name__})" for n in names
           if not isinstance(modules[n], LoRALayer) and wrapper_for(modules[n]) is None]
    if bad:
        supported = supported_type_names()
        raise ValueError(f"target_modules={config.target_modules!r} matched modules LoRA cannot wrap: {bad}; "
                         f"supported types: {supported}")
    paths = _paths_by_module(candidates)
    groups = {id(modules[n]): paths[id(modules[n])] for n in names}
    for group in groups.values():
        left_out = [p for p in group if name_matches(config.exclude_modules, p) or name_matches(config.modules_to_save, p)]
        if left_out:
            targeted = [p for p in group if p in names]
            raise ValueError(f"one module is registered under the names {group} (shared): {targeted} are "
                             f"targeted but {left_out} excluded by exclude_modules/modules_to_save; a shared "
                             "module gets one wrapper for all its names, so target or exclude all of them")
    return list(groups.values())


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The block index in a module's qualified name, by PEFT's rule (`check_target_module_exists`):
    the first `<list>.<index>.` segment, `<list>` one of `layers_pattern` (any name when it is
    empty). "model.layers.3.mlp.up" -> 3; "h.0.attn" -> None without a pattern (PEFT wants a
    name before the list), 0 with layers_pattern="h". The first index, not the last, so an
    expert index ("layers.1.experts.0.w") is not taken for the layer."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match["idx"]) if match is not None else None


def in_selected_layers(config: LoRAConfig, name: str) -> bool:
    """Whether a module that `target_modules` matches lies in `layers_to_transform` (True when
    that is None or []). As in PEFT, a name listed in full in `target_modules` is taken
    whatever its layer, and a module with no layer index is left out."""
    indices = config.layers_to_transform
    if indices is None or indices == [] or (isinstance(config.target_modules, list) and name in config.target_modules):
        return True
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == indices if isinstance(indices, int) else index in indices


def _read_without_call(candidates: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """{name: parent name} of modules whose parent reads their weights without calling them:
    the `out_proj` of an `nn.MultiheadAttention` (wrapping it alone would have no effect)."""
    out = {}
    for name, module in candidates:
        if isinstance(module, nn.MultiheadAttention):
            out[f"{name}.out_proj"] = name
    return out


def _record_tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """Set `layer.tied_with` on every LoRA layer: the other modules holding the same base
    weight Parameter (tied embeddings, e.g. `head.weight = embed.weight`). Merging into a
    tied weight would change those modules too, and add the update twice when both carry
    adapters, so merge refuses them. Returns {layer path: tied paths} for the tied ones."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((f"{path}.{pname}" if path else pname, module))
    layers = list(lora_layers(model))
    tied = {}
    for path, layer in layers:
        base, weight = layer.weight_holder() if isinstance(layer, LoRAParameter) \
            else (layer.base_layer, getattr(layer.base_layer, "weight", None))  # the parameter merge writes
        others = sorted({p for p, m in holders.get(id(weight), []) if m is not base}) \
            if isinstance(weight, nn.Parameter) else []
        # two wrappers built (by hand) around one base layer share its weight too
        others += [f"{p}.base_layer" for p, other in layers if other is not layer and other.base_layer is layer.base_layer]
        layer.tied_with = others
        layer.path = path  # for messages only: layer.merge() can then name itself
        if others:
            tied[path] = others
    return tied


def replace_module(model: nn.Module, module: nn.Module, replacement: nn.Module) -> list[str]:
    """Put `replacement` at every name `module` is registered under in `model` (a shared
    module has several); returns those names. Use it to undo a wrapping: setting one name
    would leave the module's other names pointing to the old object."""
    paths = _paths_by_module(list(_check_model(model).named_modules(remove_duplicate=False))).get(id(module), [])
    for path in paths:
        if path:  # the root itself cannot be replaced in place
            set_submodule(model, path, replacement)
    return paths


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze everything but the active adapters; `bias` = "all" also trains every bias,
    "lora_only" the biases of LoRA-wrapped layers (LoRA sec. 4.2 trains no biases)."""
    _check_model(model)
    check_choice("bias", bias, BIAS_MODES)
    for p in model.parameters():
        p.requires_grad_(False)
    activate_extras(model)  # the active modules_to_save copies and token rows
    for _, layer in lora_layers(model):
        layer._activate(layer.active_adapters)
        if bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)


def modules_to_save_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    check_patterns(config)
    names = [n for n, _ in _candidates(model) if name_matches(config.modules_to_save, n)]
    if config.modules_to_save and not names:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module; candidate module "
                         f"names: {[n for n, _ in _candidates(model)][:60]}")
    return names


def apply_lora(model: nn.Module, config: LoRAConfig, adapter_name: str = "default",
               dtype: torch.dtype | None = None) -> list[str]:
    """Wrap the targeted layers of `model` (in place) with LoRA and freeze the rest.

    Args:
        model: any nn.Module.
        config: where and how big (see `LoRAConfig`); re-checked here, since its fields
            may have been edited after construction.
        adapter_name: name of this adapter (`[A-Za-z0-9_-]{1,128}`); a second `apply_lora`
            with another name adds a second (inactive) adapter to layers already wrapped.
        dtype: adapter dtype (default float32; float64 for float64 bases).

    Returns:
        The qualified names of the wrapped modules (a shared module once, by its first name).

    Everything is checked before the model is touched. New modules take the training flag
    of the layer they wrap (a model in `eval()` gets adapters in eval mode, as in PEFT). A
    module registered under several names gets one wrapper that all its names point to.
    Modules in `config.modules_to_save` get one trainable copy per adapter, parameters in
    `config.target_parameters` a `LoRAParameter`, embeddings in `trainable_token_indices`
    trainable rows (PEFT's semantics; see lora/extra_modules.py).

    Inits that start from the weight (lora/init.py) change the base: `init="pissa"` /
    `"pissa_niter_K"` / `"olora"` rewrite each target's weight to `W - scaling * B @ A` (a
    4-bit base is dequantized, factored and its residual re-quantized: QPiSSA, lossy, with a
    warning); `init="loftq"` replaces each dense `nn.Linear` target by a `QLoRALinear` whose
    4-bit base holds LoftQ's Q (quantize_model and apply_lora in one call). To use such an
    adapter on the original base, save it with `save_adapter(..., convert_to_lora=True)`.
    """
    _check_model(model)
    config = as_lora_config(config)
    config = dataclasses.replace(config)  # re-runs LoRAConfig's checks on fields edited since construction
    check_adapter_name(adapter_name)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    configs = lora_configs(model)
    if adapter_name in configs:
        raise ValueError(f"adapter_name {adapter_name!r} is already applied to this model; "
                         "LoRA cannot be applied twice with the same name (use another adapter_name)")
    groups = _target_groups(model, config) if config.target_modules or not config.target_parameters else []
    names = [group[0] for group in groups]
    sizes = {name: _rank_and_alpha(config, group) for name, group in zip(names, groups, strict=True)}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALayer) and adapter_name in module.r:
            raise ValueError(f"{name} already has adapter {adapter_name!r}; LoRA cannot be applied twice")
    if config.dora:
        check_dora_targets(model, names)
    if config.lora_bias:
        check_lora_bias_targets(model, names)
    if rewrites_base(config.init):
        _check_init_targets(model, groups, config, sizes)
    extras = plan_extras(model, config, adapter_name, names)  # modules_to_save, target_parameters, tokens
    for group in groups:
        _wrap(model, group, config, adapter_name, dtype, *sizes[group[0]])
    apply_extras(model, config, adapter_name, extras, dtype, activate=not configs)
    if config.dora:
        for name in names:
            model.get_submodule(name).enable_dora(adapter_name)
    saved = copy.deepcopy(config)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        saved.target_modules = sorted(names)  # PEFT saves the resolved names too
    configs[adapter_name] = saved
    set_state(model, LORA_CONFIGS, configs)
    mark_only_lora_as_trainable(model, config.bias)
    _record_tied_weights(model)
    _block_fused_fast_paths(model)
    return names


# Modules with a fused inference path that reads their children's weights without calling them.
FUSED_FAST_PATH_TYPES = (nn.TransformerEncoderLayer,)


def _no_fast_path(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing: its presence keeps PyTorch off the fused path of
    `nn.TransformerEncoderLayer`, which would bypass the LoRA layers inside (see model_state)."""
    return None


def _block_fused_fast_paths(model: nn.Module) -> None:
    hooks = get_state(model, FAST_PATH_HOOKS)
    for name, module in model.named_modules():
        if isinstance(module, FUSED_FAST_PATH_TYPES) and name not in hooks \
                and any(isinstance(m, LoRALayer) for m in module.modules()):
            hooks[name] = module.register_forward_pre_hook(_no_fast_path)
    if hooks:
        set_state(model, FAST_PATH_HOOKS, hooks)


def _release_fused_fast_paths(model: nn.Module) -> None:
    for handle in get_state(model, FAST_PATH_HOOKS).values():
        handle.remove()
    drop_state(model, FAST_PATH_HOOKS)


def _weight_holders(model: nn.Module) -> dict[int, set[int]]:
    """id(parameter) -> ids of the modules holding it (a tied weight has several)."""
    holders: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), set()).add(id(module))
    return holders


def _check_init_targets(model: nn.Module, groups: list[list[str]], config: LoRAConfig,
                        sizes: dict[str, tuple[int, float]]) -> None:
    """Inits that rewrite the base (PiSSA, OLoRA, LoftQ) need, for every target, before any
    changes: a layer without adapters, of a type the init supports (LoftQ: a dense nn.Linear,
    which becomes a QLoRALinear; PiSSA/OLoRA: a linear-like layer, dense or 4-bit), r <= min(in,
    out), and a weight no other module shares (rewriting it would change that module too)."""
    holders = _weight_holders(model)
    for group in groups:
        name, module = group[0], model.get_submodule(group[0])
        where = f"init={config.init!r}: {name} ({type(module).__name__})"
        if isinstance(module, LoRALayer):
            raise ValueError(f"{where} already has adapters {module.adapter_names}; an init that rewrites the base "
                             "weight needs a layer without adapters (their training assumed the old weight)")
        if config.init == "loftq" and type(module) is not nn.Linear:
            raise ValueError(f"{where}: LoftQ needs a dense nn.Linear (its full-precision weight); it replaces it "
                             "by a QLoRALinear with a 4-bit base. Exclude this module or use another init")
        wrapper = wrapper_for(module)
        if wrapper is None or not issubclass(wrapper, LoRALinear):
            raise ValueError(f"{where}: this init is for linear layers only; exclude this module or use "
                             "init='kaiming'/'gaussian'")
        r = sizes[name][0]
        shape = (module.out_features, module.in_features) if hasattr(module, "out_features") \
            else tuple(module.weight.shape)
        if r > min(shape):
            raise ValueError(f"{where}: r={r} is larger than min(out, in) = {min(shape)} of its {shape} weight")
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and len(holders.get(id(weight), ())) > 1:
            raise ValueError(f"{where}: its weight is tied to (the same Parameter as) another module's; "
                             "rewriting it would change that module too. Untie the weights first")


def _rank_and_alpha(config: LoRAConfig, group: list[str]) -> tuple[int, float]:
    """(r, alpha) of a target; a shared module's names must agree on them."""
    sizes = {path: config.rank_and_alpha(path) for path in group}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"rank_pattern/alpha_pattern give different (r, alpha) to the names of one shared "
                         f"module: {sizes}; it gets one adapter, so they must agree")
    return sizes[group[0]]


def _wrap(model: nn.Module, group: list[str], config: LoRAConfig, adapter_name: str,
          dtype: torch.dtype | None, r: int, alpha: float) -> None:
    """Add the adapter to the module at `group[0]` (wrapping it first) and point every name in
    `group` (the names of one shared module) to the wrapper."""
    module = model.get_submodule(group[0])
    kwargs = dict(adapter_name=adapter_name, rslora=config.rslora, init=config.init, dtype=dtype)
    if config.lora_bias:  # passed only when set: a user's own wrapper type need not know the argument
        kwargs["lora_bias"] = True
    if isinstance(module, LoRALayer):
        dropout = config.dropout if module.takes_dropout else 0.0
        module.add_adapter(r=r, alpha=alpha, dropout=dropout, **kwargs)
        return
    wrapper_cls = wrapper_for(module)
    dropout = config.dropout if wrapper_cls.takes_dropout else 0.0
    if config.init == "loftq":  # the dense nn.Linear becomes a QLoRALinear holding LoftQ's 4-bit Q
        qlora_cls = LORA_LAYER_TYPES[Linear4bit]  # QLoRALinear (lora/qlora.py registers it)
        wrapper = qlora_cls.from_loftq(module, r=r, alpha=alpha, dropout=dropout, adapter_name=adapter_name,
                                       rslora=config.rslora, loftq_bits=config.loftq_bits,
                                       loftq_iter=config.loftq_iter, dtype=dtype)
    else:
        wrapper = wrapper_cls.from_layer(module, r=r, alpha=alpha, dropout=dropout,
                                         fan_in_fan_out=config.fan_in_fan_out or None, **kwargs)
    for path in group:
        set_submodule(model, path, wrapper)


def _known_adapters(model: nn.Module) -> set[str]:
    known = set(lora_configs(model))
    for _, layer in lora_layers(model):
        known |= set(layer.r)
    return known


def set_adapter(model: nn.Module, adapter_names: str | Iterable[str]) -> None:
    """Activate these adapters on every LoRA layer that has them (switching task = switching A and B).

    `adapter_names`: one name or a non-empty list; to run the base alone use `disable_adapters`."""
    _check_model(model)
    names = adapter_name_list(adapter_names)
    known = _known_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"adapter_names {unknown} not found; the model has {sorted(known)}")
    set_extras_adapter(model, names)  # checks first: raises before any layer changes
    for _, layer in lora_layers(model):
        layer._activate([n for n in names if n in layer.r])


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter from every layer (layers left with no adapter keep working as their base)."""
    _check_model(model)
    check_adapter_name(adapter_name)
    configs = lora_configs(model)
    layers = [(path, layer) for path, layer in lora_layers(model) if adapter_name in layer.r]
    if not layers and adapter_name not in configs:
        raise ValueError(f"adapter_name {adapter_name!r} not found; the model has {sorted(configs)}")
    merged = [path for path, layer in layers if adapter_name in layer.merged_adapters]
    if merged:  # checked for every layer first, so a refusal leaves the model as it was
        raise ValueError(f"adapter {adapter_name!r} is merged in {merged}; unmerge() before deleting it")
    for _, layer in layers:
        layer.delete_adapter(adapter_name)
    delete_extras_adapter(model, adapter_name)
    configs.pop(adapter_name, None)


@contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the block: merged adapters are unmerged on entry
    and merged back on exit; `modules_to_save` modules run their originals, embeddings their
    original rows. (Trained biases stay as trained.)
    4-bit layers restore their pre-merge weight exactly, so blocks do not add up errors."""
    layers = [layer for _, layer in lora_layers(model)]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    previous = {id(layer): layer.disabled for layer in layers}
    extras = disable_extras(model)  # modules_to_save originals and embedding rows of the base
    try:
        for layer in layers:
            if layer.merged:
                layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        restore_disabled(extras)
        for layer in layers:
            layer.disabled = previous[id(layer)]
            if merged[id(layer)]:
                layer.merge(adapter_names=merged[id(layer)])


def merge_and_unload(model: nn.Module, **kwargs) -> nn.Module:
    """Replace every LoRA layer by `layer.merge_and_unload(**kwargs)` (a plain layer with the
    adapters merged into its weight). Returns the same model object, now LoRA-free.

    Each layer gets the keyword arguments its own `merge_and_unload` takes, so
    `requantize=True` reaches the 4-bit layers of a model that also has plain ones; an
    argument that no layer takes is an error. `adapter_names` may name adapters that only
    some layers have. Every layer is checked (tied weights, and with `safe_merge` non-finite
    values, named by layer path) before any is merged.
    """
    layers = list(lora_layers(model))
    accepted = {id(layer): set(inspect.signature(layer.merge_and_unload).parameters) for _, layer in layers}
    unknown = set(kwargs) - set().union(*accepted.values()) if layers else set(kwargs)
    if unknown:
        raise TypeError(f"merge_and_unload got keyword arguments no LoRA layer takes: {sorted(unknown)}")
    safe_merge = check_flag("safe_merge", kwargs.get("safe_merge", False))
    names = kwargs.get("adapter_names")
    if names is not None:
        names = adapter_name_list(names)
        missing = [n for n in names if n not in _known_adapters(model)]
        if missing:
            raise ValueError(f"adapter_names {missing} not found; the model has {sorted(_known_adapters(model))}")
        check_set_adapter(model, names)  # saved-module copies / token rows of these adapters can be used together
    _record_tied_weights(model)  # ties made after apply_lora count too
    per_layer = {}
    for path, layer in layers:
        own = None if names is None else [n for n in names if n in layer.r]
        todo = layer._adapters_to_merge(own)
        if todo and safe_merge:
            layer._merged_weight(todo, True, path)  # computed and dropped: a refusal leaves the model as it was
        elif todo:
            layer.check_mergeable(todo, False, path)
        per_layer[id(layer)] = own
    for _, layer in layers:
        own = {k: v for k, v in kwargs.items() if k in accepted[id(layer)]}
        if names is not None:
            own["adapter_names"] = per_layer[id(layer)]
        replace_module(model, layer, layer.merge_and_unload(**own))  # every name of a shared layer
    unload_extras(model, merge=True, adapter_names=names)  # saved-module copies; token rows written into weights
    drop_state(model, LORA_CONFIGS)
    _release_fused_fast_paths(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its base layer, dropping the adapters (unmerging first)."""
    for _, layer in list(lora_layers(model)):
        if layer.merged:
            layer.unmerge()
        replace_module(model, layer, layer.base_layer)  # every name of a shared layer
    unload_extras(model, merge=False)
    drop_state(model, LORA_CONFIGS)
    _release_fused_fast_paths(model)
    return model


def _param_count(p: torch.Tensor) -> int:
    # A packed 4-bit weight stores two values per uint8 byte; count the values (as PEFT does for Params4bit).
    return p.numel() * 2 if p.dtype == torch.uint8 else p.numel()


def _quantized_weight_count(model: nn.Module) -> int:
    """Weights held as packed 4-bit codes in a `weight_packed` buffer (as `quant.LinearNF4`):
    `in_features * out_features` each, so QLoRA counts match PEFT's (which counts
    bitsandbytes' Params4bit as parameters)."""
    return sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m._buffers.get("weight_packed"), torch.Tensor)
               and hasattr(m, "in_features") and hasattr(m, "out_features"))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; shared (tied) tensors count once, frozen 4-bit
    weights count one per value."""
    _check_model(model)
    trainable = total = 0
    for p in model.parameters():
        n = _param_count(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total + _quantized_weight_count(model)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the counts in PEFT's format."""
    trainable, total = trainable_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
