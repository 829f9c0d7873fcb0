"""What a `LoRAConfig` adds beside LoRA layers on modules, as PEFT does:

- `modules_to_save`: one trainable copy per adapter (`ModulesToSave`), the original kept
  for disabled adapters and for adapters that did not list the module;
- `target_parameters`: LoRA on raw `nn.Parameter`s (`LoRAParameter`), several parameters
  of one module nested in the module's own parameter order (PEFT's `ParamWrapper` order);
- `trainable_token_indices`: some rows of an embedding trained in full (`TrainableTokens`),
  an output head whose weight is that embedding's wrapped with `tied_to`.

`apply_lora` calls `plan_extras` (every check, nothing changed) before it touches the
model and `apply_extras` after its LoRA layers are in; `set_adapter`, `delete_adapter`,
`disable_adapters`, `merge_and_unload` and `unload` route to the wrappers through the
functions below. `LoRAParameter` is a `LoRALayer`, so those functions already reach it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from quant.module_paths import name_matches, set_submodule

from .config import LoRAConfig, rewrites_base
from .layer import LoRALayer
from .model_state import lora_configs
from .modules_to_save import ModulesToSave
from .param_wrapper import LoRAParameter, _owner
from .trainable_tokens import TrainableTokens, check_token_indices

EXTRA_WRAPPERS = (ModulesToSave, TrainableTokens)
INPUT_EMBEDDING_NAME = "embed_tokens"  # PEFT's fallback when a model has no get_input_embeddings()


@dataclass
class ExtrasPlan:
    """What `apply_extras` will do, resolved and checked by `plan_extras`."""

    save: list[str] = field(default_factory=list)  # module paths to copy per adapter
    params: list[tuple[str, str]] = field(default_factory=list)  # (module path, parameter name), wrapping order
    tokens: list[tuple[str, list[int]]] = field(default_factory=list)  # (embedding path, token ids)
    tied: list[tuple[str, str]] = field(default_factory=list)  # (head path, embedding path) sharing one weight


def extra_wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, wrapper) of every `ModulesToSave` / `TrainableTokens` in the model, once each."""
    for name, module in model.named_modules():
        if isinstance(module, EXTRA_WRAPPERS):
            yield name, module


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def _plain_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules outside LoRA layers and extra wrappers (those wrappers themselves included)."""
    every = list(model.named_modules(remove_duplicate=False))
    walls = [n for n, m in every if isinstance(m, (LoRALayer,) + EXTRA_WRAPPERS)]
    return [(n, m) for n, m in every if n and not _inside(n, walls)]


def pattern_name(path: str, layer: nn.Module) -> str:
    """The name `rank_pattern` / `alpha_pattern` match for a LoRA layer at `path`: its path,
    or for a `LoRAParameter` "<module path>.<parameter>" (PEFT's key for ParamWrapper)."""
    if not isinstance(layer, LoRAParameter):
        return path
    while path.endswith(".base_layer"):
        path = path[:-len(".base_layer")]
    return f"{path}.{layer.parameter_name}"


# ----- planning: every check, nothing changed -----
def plan_extras(model: nn.Module, config: LoRAConfig, adapter_name: str, lora_targets: list[str]) -> ExtrasPlan:
    """Resolve and check `modules_to_save`, `target_parameters` and `trainable_token_indices`
    of `config` for adapter `adapter_name` (`lora_targets`: the module paths LoRA will wrap).
    Raises ValueError/TypeError naming the field; the model is not changed."""
    plan = ExtrasPlan()
    plan.save = _plan_save(model, config, adapter_name, lora_targets)
    plan.params = _plan_params(model, config, adapter_name, lora_targets + plan.save)
    taken = lora_targets + plan.save + [path for path, _ in plan.params]
    plan.tokens, plan.tied = _plan_tokens(model, config, adapter_name, taken, plan.save)
    return plan


def _plan_save(model: nn.Module, config: LoRAConfig, adapter_name: str, lora_targets: list[str]) -> list[str]:
    if not config.modules_to_save:
        return []
    candidates = _plain_candidates(model)
    names = [n for n, _ in candidates if name_matches(config.modules_to_save, n)]
    if not names:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module; candidate module "
                         f"names: {[n for n, _ in candidates][:60]}")
    out, seen = [], set()
    for name in names:
        module = model.get_submodule(name)
        if id(module) in seen:  # a shared module: one wrapper for all its names
            continue
        seen.add(id(module))
        if isinstance(module, ModulesToSave):
            if adapter_name in module.modules_to_save:
                raise ValueError(f"modules_to_save: {name} already has a copy for adapter {adapter_name!r}")
        elif isinstance(module, (LoRALayer, TrainableTokens)):
            raise ValueError(f"modules_to_save: {name} already carries {type(module).__name__} adapters; a module "
                             "is either trained in full (modules_to_save) or adapted, not both")
        else:
            inner = [n for n, m in module.named_modules() if isinstance(m, (LoRALayer,) + EXTRA_WRAPPERS)]
            inner += [t for t in lora_targets if t.startswith(name + ".")]
            if inner:
                raise ValueError(f"modules_to_save: {name} contains adapted modules {inner[:8]}; its copies would "
                                 "copy their adapters too. Leave them out of target_modules or of modules_to_save")
        out.append(name)
    return out


def _plan_params(model: nn.Module, config: LoRAConfig, adapter_name: str,
                 taken: list[str]) -> list[tuple[str, str]]:
    """(module path, parameter) pairs in PEFT's order: modules as `named_modules` lists them,
    each module's parameters in registration order (the first wrapped is the innermost).
    `taken`: module paths this adapter wraps otherwise (LoRA targets, modules_to_save)."""
    targets = config.target_parameters
    if not targets:
        return []
    where = f"target_parameters={targets!r}"
    if config.dropout:
        raise ValueError(f"{where} with dropout={config.dropout}: LoRA on a parameter has no input to drop out "
                         "(PEFT refuses it too); use dropout=0")
    if config.dora or rewrites_base(config.init):
        raise ValueError(f"{where}: DoRA and inits that rewrite the base (init={config.init!r}) are not supported "
                         "for parameters; use dora=False and init='kaiming' or 'gaussian'")
    for other, other_config in lora_configs(model).items():
        theirs = getattr(other_config, "target_parameters", None)
        if theirs and set(theirs) != set(targets):  # nesting order would differ per adapter (PEFT's rule too)
            raise ValueError(f"{where}: adapter {other!r} targets {sorted(theirs)}; all adapters that use "
                             "target_parameters must target the same parameters")
    owners: dict[int, str] = {}  # id(real module) -> the path of its outermost LoRAParameter
    walls = []
    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoRAParameter):
            owners.setdefault(id(_owner(module)[0]), name)
            continue
        if isinstance(module, (LoRALayer,) + EXTRA_WRAPPERS):
            walls.append(name)
            continue
        # names are matched without the "base_layer." steps of wrappers (PEFT's rule); a parameter's
        # own module is wrapped where its outermost LoRAParameter sits, any other where it is
        path = owners.get(id(module), name)
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{owners.get(id(module), name.replace('.base_layer', ''))}.{pname}"
            if not any(key == t or key.endswith("." + t) for t in targets):
                continue
            if _inside(name, walls) or not path or path in taken or _inside(path, taken):
                raise ValueError(f"{where} matched {key!r}, "
                                 + ("a parameter of the model itself (it has no parent to hold a wrapper)"
                                    if not path else "inside a layer that already carries adapters (a LoRA target "
                                    "or a modules_to_save / trainable-tokens module)"))
            out.append((path, pname))
    if not out:
        raise ValueError(f"{where} matched no parameter; give 'module.path.param' names (or dotted suffixes) "
                         "of parameters that are not inside other adapted layers")
    for path, pname in out:
        _check_param(model, path, pname, adapter_name)
    return out


def _check_param(model: nn.Module, path: str, pname: str, adapter_name: str) -> None:
    top = model.get_submodule(path)
    existing = _param_wrapper(top, pname)
    if existing is not None and adapter_name in existing.r:
        raise ValueError(f"target_parameters: {path}.{pname} already has adapter {adapter_name!r}")
    param = getattr(_owner(top)[0], pname)
    if not param.is_floating_point() or param.dim() not in (2, 3):
        raise ValueError(f"target_parameters: {path}.{pname} must be a 2-D (out, in) or 3-D (experts, a, b) float "
                         f"tensor, got shape {tuple(param.shape)} {param.dtype}")


def _param_wrapper(top: nn.Module, pname: str) -> LoRAParameter | None:
    while isinstance(top, LoRAParameter):
        if top.parameter_name == pname:
            return top
        top = top.base_layer
    return None


def _input_embedding_name(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    for name, module in model.named_modules():
        if emb is not None and module is emb:
            return name
    return INPUT_EMBEDDING_NAME


def _plan_tokens(model: nn.Module, config: LoRAConfig, adapter_name: str, lora_targets: list[str],
                 save: list[str]) -> tuple[list[tuple[str, list[int]]], list[tuple[str, str]]]:
    """(embedding path, ids) to wrap and (tied head, embedding) pairs; `lora_targets`: every
    module path this adapter wraps otherwise (LoRA targets, saved modules, parameter owners)."""
    spec = config.trainable_token_indices
    if spec is None:
        return [], []
    layers = spec if isinstance(spec, dict) else {_input_embedding_name(model): spec}
    candidates = _plain_candidates(model)
    tokens: list[tuple[str, list[int]]] = []
    seen: dict[int, str] = {}  # id(module) -> its first name: a shared module is wrapped once
    for key, ids in layers.items():
        label = f"trainable_token_indices[{key!r}]" if isinstance(spec, dict) else "trainable_token_indices"
        names = [n for n, _ in candidates if name_matches([key], n)]
        if not names:
            raise ValueError(f"{label}: no module named {key!r} (or ending in '.{key}'); candidate module names: "
                             f"{[n for n, _ in candidates][:60]}")
        for name in names:
            module = model.get_submodule(name)
            if id(module) in seen:
                raise ValueError(f"{label}: {name} is the module {seen[id(module)]!r} again (matched twice or "
                                 "registered under two names); give its token ids once")
            seen[id(module)] = name
            if name in lora_targets or name in save or isinstance(module, (LoRALayer, ModulesToSave)):
                raise ValueError(f"{label}: {name} is also a LoRA target, in modules_to_save or in "
                                 "target_parameters; train its rows one way only (PEFT refuses this too)")
            base = module.base_layer if isinstance(module, TrainableTokens) else module
            if not isinstance(base, (nn.Embedding, nn.Linear)):
                raise ValueError(f"{label}: {name} is a {type(base).__name__}; trainable tokens need an nn.Embedding "
                                 "(or an nn.Linear head)")
            if isinstance(module, TrainableTokens):
                if module._tied:
                    continue  # a tied head follows its embedding
                if adapter_name in module.adapter_names:
                    raise ValueError(f"{label}: {name} already has adapter {adapter_name!r}")
            check_token_indices(ids, base.weight.shape[0], label)
            tokens.append((name, list(ids)))
    tokens = _drop_tied_duplicates(model, tokens)
    return tokens, _tied_heads(model, tokens, lora_targets, save)


def _embedding_weights(model: nn.Module, tokens: list[tuple[str, list[int]]]) -> dict[int, tuple[str, list[int]]]:
    """id(weight) -> (path, ids) of each embedding in `tokens` (a head tied to it holds that weight)."""
    found = {}
    for name, ids in tokens:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, TrainableTokens) else module
        if isinstance(base, nn.Embedding):
            found[id(base.weight)] = (name, ids)
    return found


def _drop_tied_duplicates(model: nn.Module, tokens: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    """A head named with the same ids as the embedding whose weight it holds is handled as tied
    (PEFT's rule); with other ids it keeps its own rows."""
    embeddings = _embedding_weights(model, tokens)
    kept = []
    for name, ids in tokens:
        module = model.get_submodule(name)
        tied = embeddings.get(id(module.weight)) if type(module) is nn.Linear else None
        if tied is None or tied[1] != ids:
            kept.append((name, ids))
    return kept


def _tied_heads(model: nn.Module, tokens: list[tuple[str, list[int]]], lora_targets: list[str],
                save: list[str]) -> list[tuple[str, str]]:
    """(head path, embedding path) for each plain `nn.Linear` whose weight is the weight of an
    embedding getting trainable rows: it must see the same rows (else input and output
    embeddings silently disagree), so it is wrapped with `tied_to`."""
    embeddings = {key: name for key, (name, _) in _embedding_weights(model, tokens).items()}
    own = {name for name, _ in tokens}
    out = []
    for name, module in _plain_candidates(model):
        if isinstance(module, LoRALayer) and id(getattr(module.base_layer, "weight", None)) in embeddings:
            raise ValueError(f"trainable_token_indices: {name} is a LoRA target whose weight is tied to "
                             f"{embeddings[id(module.base_layer.weight)]}; its output would not see the trained "
                             "rows. Leave it out of target_modules")
        if type(module) is nn.Linear and id(module.weight) in embeddings and name not in own:
            if name in lora_targets or name in save:
                raise ValueError(f"trainable_token_indices: {name} shares its weight with "
                                 f"{embeddings[id(module.weight)]} and is also a LoRA target or in modules_to_save")
            out.append((name, embeddings[id(module.weight)]))
    return out


# ----- applying -----
def apply_extras(model: nn.Module, config: LoRAConfig, adapter_name: str, plan: ExtrasPlan,
                 dtype: torch.dtype | None, activate: bool) -> None:
    """Carry out `plan` (from `plan_extras`, nothing left to fail). The new copies / rows are
    active when `activate` (the model's first adapter), as PEFT activates only the first."""
    for name in plan.save:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSave):
            module.add_adapter(adapter_name, activate=activate)
        else:
            wrapper = ModulesToSave(module, adapter_name)
            if not activate:
                wrapper.set_adapter(None)
            _replace_all(model, module, wrapper)
    for path, pname in plan.params:
        _wrap_param(model, config, adapter_name, path, pname, dtype)
    for name, ids in plan.tokens:
        module = model.get_submodule(name)
        if isinstance(module, TrainableTokens):
            module.add_adapter(adapter_name, ids, activate=activate)
        else:
            wrapper = TrainableTokens(module, ids, adapter_name=adapter_name)
            if not activate:
                wrapper.set_adapter([])
            _replace_all(model, module, wrapper)
    for head_path, emb_path in plan.tied:
        head = model.get_submodule(head_path)
        if not isinstance(head, TrainableTokens):
            _replace_all(model, head, TrainableTokens(head, tied_to=model.get_submodule(emb_path)))


def _replace_all(model: nn.Module, module: nn.Module, replacement: nn.Module) -> None:
    """`replacement` at every name `module` has (a shared module keeps one wrapper)."""
    for path, m in list(model.named_modules(remove_duplicate=False)):
        if m is module and path:
            set_submodule(model, path, replacement)


def _wrap_param(model: nn.Module, config: LoRAConfig, adapter_name: str, path: str, pname: str,
                dtype: torch.dtype | None) -> None:
    top = model.get_submodule(path)
    r, alpha = config.rank_and_alpha(f"{path}.{pname}")
    existing = _param_wrapper(top, pname)
    if existing is not None:
        existing.add_adapter(adapter_name, r=r, alpha=alpha, rslora=config.rslora, init=config.init, dtype=dtype)
        return
    wrapper = LoRAParameter(top, pname, r=r, alpha=alpha, adapter_name=adapter_name, rslora=config.rslora,
                            init=config.init, dtype=dtype)
    _replace_all(model, top, wrapper)


# ----- routing: set / disable / delete / trainable flags / unload -----
def check_set_adapter(model: nn.Module, names: list[str]) -> None:
    """Raise ValueError if the wrappers cannot run `names` together (checked before any change)."""
    for path, wrapper in extra_wrappers(model):
        if isinstance(wrapper, ModulesToSave):
            both = [n for n in names if n in wrapper.modules_to_save]
            if len(both) > 1:
                raise ValueError(f"adapter_names {names}: {both} each have their own copy of {path} "
                                 "(modules_to_save); only one of them can run at a time")
        elif not wrapper._tied:
            wrapper.check_adapter_names([n for n in names if n in wrapper.adapter_names])


def set_extras_adapter(model: nn.Module, names: list[str]) -> None:
    """Route every wrapper to `names` (a wrapper without any of them runs its original)."""
    check_set_adapter(model, names)
    for _, wrapper in extra_wrappers(model):
        if isinstance(wrapper, ModulesToSave):
            mine = [n for n in names if n in wrapper.modules_to_save]
            wrapper.set_adapter(mine[0] if mine else None)
        elif not wrapper._tied:
            wrapper.set_adapter([n for n in names if n in wrapper.adapter_names])


def activate_extras(model: nn.Module) -> None:
    """Make the active copies / rows trainable again (after everything was frozen)."""
    for _, wrapper in extra_wrappers(model):
        if isinstance(wrapper, ModulesToSave):
            wrapper.set_adapter(wrapper.active_adapter)
        elif not wrapper._tied:
            wrapper.set_adapter(wrapper.active_adapters)


def disable_extras(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Disable every wrapper (the original runs); returns what `restore_disabled` needs."""
    before = [(w, w.disabled) for _, w in extra_wrappers(model)]
    for wrapper, _ in before:
        wrapper.disabled = True
    return before


def restore_disabled(before: list[tuple[nn.Module, bool]]) -> None:
    for wrapper, flag in before:
        wrapper.disabled = flag


def delete_extras_adapter(model: nn.Module, adapter_name: str) -> None:
    """Drop `adapter_name`'s copies and rows; a wrapper left with none gives its module back."""
    for _, wrapper in list(extra_wrappers(model)):
        if isinstance(wrapper, ModulesToSave):
            if adapter_name in wrapper.modules_to_save:
                wrapper.delete_adapter(adapter_name)
            if not wrapper.modules_to_save:
                _replace_all(model, wrapper, wrapper.original_module)
        elif not wrapper._tied and adapter_name in wrapper.adapter_names:
            wrapper.delete_adapter(adapter_name)
    for _, wrapper in list(extra_wrappers(model)):  # embeddings left without rows, and their tied heads
        if isinstance(wrapper, TrainableTokens) and not wrapper.rows.token_indices:
            _replace_all(model, wrapper, wrapper.base_layer)


def extras_adapter_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for _, wrapper in extra_wrappers(model):
        names |= set(wrapper.adapter_names)
    return names


def unload_extras(model: nn.Module, merge: bool, adapter_names: list[str] | None = None) -> None:
    """Take the wrappers out: `merge` leaves the saved-module copy of the active adapter (or of
    the one in `adapter_names` that has one) and writes its token rows into the embedding
    weight (PEFT's merge_and_unload); otherwise the originals come back unchanged.
    `adapter_names` must have passed `check_set_adapter`."""
    if merge and adapter_names is not None:
        set_extras_adapter(model, adapter_names)  # route to them, then keep what they route to
    for _, wrapper in list(extra_wrappers(model)):
        if isinstance(wrapper, ModulesToSave):
            plain = wrapper.unwrap() if merge and not wrapper.disabled else wrapper.original_module
        elif merge and not wrapper._tied and not wrapper.is_disabled:
            plain = wrapper.merged_base()
        else:
            plain = wrapper.base_layer
        _replace_all(model, wrapper, plain)


# ----- files (PEFT's keys, without "base_model.model.") -----
def extra_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The live tensors of `adapter_name` held by the wrappers: a saved module's copy under
    `<module>.<param>` and trainable rows under `<embedding>.token_adapter.trainable_tokens_delta`
    (a tied head stores nothing: its rows are the embedding's)."""
    out: dict[str, torch.Tensor] = {}
    for path, wrapper in extra_wrappers(model):
        if isinstance(wrapper, ModulesToSave) and adapter_name in wrapper.modules_to_save:
            for key, t in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{path}.{key}"] = t
        elif isinstance(wrapper, TrainableTokens) and not wrapper._tied and adapter_name in wrapper.adapter_names:
            out[f"{path}.token_adapter.trainable_tokens_delta"] = wrapper.rows.trainable_tokens_delta[adapter_name]
    return out


def snapshot_extras(model: nn.Module) -> dict:
    """What `apply_extras` may change, for `restore_extras` to undo a load that failed its checks."""
    return {"wrappers": {id(w): (w, list(w.adapter_names), getattr(w, "active_adapter", None),
                                 list(getattr(w, "_active", [])))
                         for _, w in extra_wrappers(model)}}


def restore_extras(model: nn.Module, snap: dict) -> None:
    for _, wrapper in list(extra_wrappers(model)):
        before = snap["wrappers"].get(id(wrapper))
        if before is None:  # added by the trial: put the module back
            base = wrapper.original_module if isinstance(wrapper, ModulesToSave) else wrapper.base_layer
            _replace_all(model, wrapper, base)
            continue
        _, names, active, rows_active = before
        for extra in [n for n in wrapper.adapter_names if n not in names]:
            wrapper.delete_adapter(extra)
        if isinstance(wrapper, ModulesToSave):
            wrapper.set_adapter(active)
        elif not wrapper._tied:
            wrapper.set_adapter(rows_active)


def check_mixed_batch(model: nn.Module, names: list[str]) -> None:
    """A mixed batch (`lora.use_adapters`) routes LoRA layers row by row; saved-module copies
    and trainable token rows have no per-row path and run what they run now for every row.
    So every row's adapter (`"__base__"`: none) must select exactly that here, else a
    ValueError naming `adapter_names` (the rows would silently get another adapter's module)."""
    for path, wrapper in extra_wrappers(model):
        if isinstance(wrapper, TrainableTokens) and wrapper._tied:
            continue  # follows its embedding, checked there
        now = wrapper.current() if isinstance(wrapper, ModulesToSave) else \
            ([] if wrapper.is_disabled else list(wrapper.active_adapters))
        for name in dict.fromkeys(names):
            if isinstance(wrapper, ModulesToSave):
                wants = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
            else:
                wants = [name] if name in wrapper.adapter_names else []
            if wants is not now and wants != now:
                raise ValueError(f"adapter_names: rows with {name!r} need a different {type(wrapper).__name__} "
                                 f"at {path} (modules_to_save / trainable_token_indices) than the one active now, "
                                 "and it has no per-row path; run such adapters one at a time with set_adapter")
