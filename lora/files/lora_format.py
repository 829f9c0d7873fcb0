"""LoRA / DoRA adapters in PEFT's file layout (peft_type LORA).

Keys (without `base_model.model.`): `<path>.lora_A.weight`, `<path>.lora_B.weight`,
`<path>.lora_embedding_A` / `_B` (embeddings), `<path>.lora_magnitude_vector` (DoRA's m),
`<path>.base_layer.bias` (bias="lora_only"), `<module>.<param>` (the adapter's modules_to_save copy),
`<embedding>.token_adapter.trainable_tokens_delta` (trainable_token_indices), and for
target_parameters `<module>[.base_layer...].lora_A.weight` (nested wrappers). One
adapter name per folder; loading checks everything against layers built on trial and
takes them out again on any failure.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import nn

from quant import Linear4bit

from ..config import ALL_LINEAR, LoRAConfig, rewrites_base
from ..extra_modules import extra_tensors, pattern_name, restore_extras, snapshot_extras
from ..inject import apply_lora, lora_layers, replace_module, resolve_targets
from ..model_state import (
    BOTTLENECK_CONFIGS,
    LORA_CONFIGS,
    drop_state,
    get_state,
    has_state,
    set_state,
)
from ..param_wrapper import LoRAParameter
from .checks import check_fit, copy_into
from .folder import CONFIG_NAME, META_BASE, PREFIX, WEIGHTS_NAME
from .saved_embeddings import embedding_weights, warn_replaced

PEFT_TYPE = "LORA"


def adapter_tensors(model: nn.Module, adapter_name: str, config: LoRAConfig) -> dict[str, torch.Tensor]:
    """The live tensors that belong in the file of one adapter, by file key (without PREFIX)."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if adapter_name not in layer.r:
            continue
        for dict_name in layer.adapter_dict_names:
            container = getattr(layer, dict_name)
            if adapter_name not in container:  # e.g. no DoRA magnitude for a plain LoRA adapter
                continue
            obj = container[adapter_name]
            if dict_name == "lora_magnitude_vector":  # PEFT's file key has no ".weight" (DoRA)
                out[f"{path}.{dict_name}"] = obj.weight
            elif isinstance(obj, nn.Parameter):
                out[f"{path}.{dict_name}"] = obj
            else:
                for key, t in obj.state_dict(keep_vars=True).items():
                    out[f"{path}.{dict_name}.{key}"] = t
        if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            out[f"{path}.base_layer.bias"] = layer.base_layer.bias
    if config.bias == "all":
        out.update({n: p for n, p in model.named_parameters() if n.endswith("bias")})
    out.update(extra_tensors(model, adapter_name))  # modules_to_save copies, trainable token rows
    return out


def _converted_to_lora(model: nn.Module, adapter_name: str, config: LoRAConfig,
                       tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """A PiSSA/OLoRA adapter as a plain LoRA of rank 2r for the original base (PEFT's
    `subtract_mutated_init`): W = W_res + s B0 A0 and the trained W_res + s B A give
    `Delta W = s (B A - B0 A0) = s [B | -B0] [A ; A0]`. Rank and alpha double (alpha * sqrt 2
    with rsLoRA), so the scaling stays s. (A0, B0) are the layer's `initial_factors`."""
    if config.init == "loftq":
        raise ValueError(f"adapter {adapter_name!r}: convert_to_lora cannot convert a LoftQ adapter: its base is "
                         "LoftQ's quantized Q, not the original weight, and W - Q is not low-rank. Keep the "
                         "4-bit base (its state_dict) with the adapter instead")
    out = dict(tensors)
    for path, layer in lora_layers(model):
        if adapter_name not in layer.r:
            continue
        if adapter_name not in layer.initial_factors:
            raise ValueError(f"adapter {adapter_name!r} of {path}: the initial factors (A0, B0) of its "
                             f"init={config.init!r} are not known (they are kept by apply_lora in this process; "
                             "a loaded adapter does not have them), so it cannot be converted to a plain LoRA")
        A0, B0 = layer.initial_factors[adapter_name]
        A, B = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
        out[f"{path}.lora_A.weight"] = torch.cat([A.detach(), A0.to(A.dtype)], dim=0)  # (2r, in)
        out[f"{path}.lora_B.weight"] = torch.cat([B.detach(), -B0.to(B.dtype)], dim=1)  # (out, 2r)
    factor = math.sqrt(2) if config.rslora else 2  # keeps alpha / r (or alpha / sqrt r) unchanged
    converted = copy.deepcopy(config)
    converted.init, converted.r, converted.alpha = "kaiming", 2 * config.r, config.alpha * factor
    converted.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    converted.alpha_pattern = {k: v * factor for k, v in config.alpha_pattern.items()}
    return out, converted


_FACTOR_RANK_DIM = {".lora_A.weight": 0, ".lora_B.weight": 1, ".lora_embedding_A": 0, ".lora_embedding_B": 1}


def _check_targets_have_tensors(model: nn.Module, config: LoRAConfig, found: dict[str, torch.Tensor],
                                directory: Path) -> None:
    """Every module the config targets has tensors in the file, before layers are built for
    them (a rank_pattern could otherwise ask for a huge layer the file does not even hold)."""
    empty = [path for path in _module_targets(model, config)
             if not any(key.startswith(path + ".") for key in found)]
    if empty:
        raise ValueError(f"adapter in {directory} does not fit the model: missing keys for {empty} "
                         f"(its {CONFIG_NAME} targets them, its weights do not hold them)")


def _module_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The modules `target_modules` selects (none when only `target_parameters` are adapted)."""
    if not config.target_modules and config.target_parameters:
        return []
    return resolve_targets(model, config)


def _check_ranks(model: nn.Module, config: LoRAConfig, found: dict[str, torch.Tensor], directory: Path) -> None:
    """Each A / B factor in the file has the rank the config gives its layer (before any
    layer of that rank is built). Factors of `target_parameters` (r * experts rows, nested
    `base_layer.` paths) are checked against the layers built on trial instead."""
    modules = set(_module_targets(model, config)) if config.target_parameters else None
    for key, t in found.items():
        for suffix, dim in _FACTOR_RANK_DIM.items():
            if key.endswith(suffix):
                path = key[:-len(suffix)]
                if modules is not None and path not in modules:
                    continue
                r, _ = config.rank_and_alpha(path)
                # conv factors are 3-5-D (PEFT's layout); a grouped conv's B holds r / groups channels
                grouped_b = t.dim() > 2 and dim == 1 and 0 < t.shape[1] and r % t.shape[1] == 0
                if t.dim() < 2 or t.dim() > 5 or (t.shape[dim] != r and not grouped_b):
                    raise ValueError(f"adapter in {directory} has wrong shapes for its {CONFIG_NAME}: tensor "
                                     f"{key!r} is {tuple(t.shape)} but the config gives {path} rank r={r}")


def _snapshot(model: nn.Module) -> dict:
    """What `apply_lora` may change, to undo a trial that fails its checks."""
    configs = get_state(model, LORA_CONFIGS) if has_state(model, LORA_CONFIGS) else None  # None: restored as absent
    return {"layers": {n: (layer, list(layer.r), list(layer.active_adapters), list(getattr(layer, "tied_with", [])))
                       for n, layer in lora_layers(model)}, "extras": snapshot_extras(model),
            "grad": {id(p): p.requires_grad for p in model.parameters()},
            "configs": configs, "config_items": dict(configs) if configs is not None else None}


def _restore(model: nn.Module, snap: dict) -> None:
    restore_extras(model, snap["extras"])
    for name, layer in list(lora_layers(model)):
        before = snap["layers"].get(name)
        if before is None or before[0] is not layer:  # a wrapper the trial added: put the base back
            replace_module(model, layer, layer.base_layer)  # under every name of a shared module
            continue
        _, names, active, tied = before
        for extra in [n for n in layer.r if n not in names]:
            layer.delete_adapter(extra)
        layer.active_adapters = active
        if hasattr(layer, "tied_with"):
            layer.tied_with = tied
    for p in model.parameters():
        if id(p) in snap["grad"]:
            p.requires_grad_(snap["grad"][id(p)])
    if snap["configs"] is None:
        drop_state(model, LORA_CONFIGS)
    else:  # the same dict object as before, with the same items
        snap["configs"].clear()
        snap["configs"].update(snap["config_items"])
        set_state(model, LORA_CONFIGS, snap["configs"])


def _expected(model: nn.Module, adapter_name: str, config: LoRAConfig, found: dict[str, torch.Tensor],
              directory: Path) -> dict[str, torch.Tensor]:
    """The model's tensors the file must fill: the adapter's own, plus any embedding / head
    weights the file holds in full (`saved_embeddings`)."""
    expected = adapter_tensors(model, adapter_name, config)
    expected.update(embedding_weights(model, found, expected, directory))
    return expected


def _trial_apply(model: nn.Module, config: LoRAConfig, adapter_name: str, is_trainable: bool,
                 found: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    """Add the adapter's layers (keys and shapes can only be checked against real layers);
    on any failure take them out again, leaving the model exactly as it was. The layers start
    as plain LoRA whatever the file's init: the weights come from the file, and the base is
    never rewritten by a load (except embedding / head weights the file holds in full,
    `saved_embeddings`)."""
    snap = _snapshot(model)
    try:
        apply_lora(model, dataclasses.replace(config, init="kaiming"), adapter_name=adapter_name)
        if not is_trainable:  # inference, as PEFT's from_pretrained: everything frozen
            model.requires_grad_(False)
        expected = _expected(model, adapter_name, config, found, directory)
        check_fit(expected, found, directory)
    except BaseException:
        _restore(model, snap)
        raise
    return expected


def _check_existing(model: nn.Module, adapter_name: str, config: LoRAConfig, directory: Path) -> None:
    """Loading into an adapter the model already has: it must not be merged, the file's
    targets must be its layers, and its dropout (built with the layers, not changed by a
    load) must be the file's. Rank and keys are checked against the layers after this."""
    merged = [path for path, layer in lora_layers(model) if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged in {merged}; unmerge() before loading")
    have = sorted(path for path, layer in lora_layers(model)
                  if adapter_name in layer.r and not isinstance(layer, LoRAParameter))
    want = sorted(_module_targets(model, config))
    if want != have:
        raise ValueError(f"{directory / CONFIG_NAME}: target_modules select {want}, but adapter {adapter_name!r} "
                         f"of the model is on {have}; load it under another adapter_name")
    current = get_state(model, LORA_CONFIGS)[adapter_name]
    if current.dropout != config.dropout:
        raise ValueError(f"{directory / CONFIG_NAME}: lora_dropout={config.dropout} differs from adapter "
                         f"{adapter_name!r} of the model (dropout={current.dropout}), which a load cannot "
                         f"change; delete_adapter(model, {adapter_name!r}) first, or load under another adapter_name")


def _store_config(model: nn.Module, adapter_name: str, config: LoRAConfig, paths: list[str]) -> None:
    """Record the file's config as the adapter's, so that a later save writes what was loaded."""
    stored = copy.deepcopy(config)
    if isinstance(stored.target_modules, str) and stored.target_modules.lower() == ALL_LINEAR:
        stored.target_modules = sorted(paths)  # as apply_lora records it
    get_state(model, LORA_CONFIGS)[adapter_name] = stored


def _check_base_matches(config: LoRAConfig, rewritten_base: bool, directory: Path) -> None:
    """An adapter trained on a rewritten base (PiSSA/OLoRA residual, LoftQ's Q) gives wrong
    outputs on the original base: refused unless the caller says the base is the rewritten one."""
    if rewrites_base(config.init) and not rewritten_base:
        remedy = ("convert it with save_adapter(model, dir, convert_to_lora=True) where it was trained"
                  if config.init != "loftq" else "LoftQ adapters need LoftQ's 4-bit base Q")
        raise ValueError(f"{directory / CONFIG_NAME}: init_lora_weights={config.init!r}: this adapter was trained "
                         f"on a base that its init rewrote, not on the original weights, so on an original base "
                         f"it gives wrong outputs; {remedy}. If this model's base already holds the rewritten "
                         "weights, pass rewritten_base=True")


def base_format(module: nn.Module) -> str:
    """A base layer's storage format: its 4-bit format tag ("nf3:64:1:2", `Linear4bit.format_tag`)
    or "dense"."""
    return module.format_tag() if isinstance(module, Linear4bit) else "dense"


def base_formats(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """{layer path: `base_format` of its base} for the layers carrying `adapter_name`: saved in
    the weights file's metadata (META_BASE; PEFT ignores it)."""
    return {path: base_format(layer.base_layer) for path, layer in lora_layers(model)
            if adapter_name in layer.r and isinstance(getattr(layer, "base_layer", None), nn.Module)}


def check_base_formats(model: nn.Module, config: LoRAConfig, metadata: dict[str, str], directory: Path,
                       rewritten_base: bool) -> None:
    """An adapter whose init rewrote its base (LoftQ's Q, a PiSSA/OLoRA residual) fits only a base
    rewritten the same way; `rewritten_base=True` says this model's base is that one. Where the
    file records the base formats it was saved with, a different format here (NF4 against NF3,
    4-bit against dense) is a ValueError naming the layers, before anything changes. (Inits with
    B = 0 fit any base, and files PEFT wrote record nothing: neither is checked.)"""
    if not (rewrites_base(config.init) and rewritten_base) or META_BASE not in metadata:
        return
    where = f"{directory / WEIGHTS_NAME} (metadata {META_BASE})"
    try:
        recorded = json.loads(metadata[META_BASE])
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in recorded.items()):
        raise ValueError(f"{where} must map layer paths to format strings")
    modules = dict(model.named_modules())
    wrong = []
    for path, saved in sorted(recorded.items()):
        module = modules.get(path)
        if module is None:
            continue  # a missing target is reported by the key checks
        here = base_format(getattr(module, "base_layer", module))
        if here != saved:
            wrong.append(f"{path}: {saved} in the file, {here} here")
    if wrong:
        raise ValueError(f"{directory}: init_lora_weights={config.init!r} rewrote the base this adapter was trained "
                         f"on, and this model's base has another format in {len(wrong)} layers ("
                         f"{'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}); rewritten_base=True "
                         "needs the base rewritten with the same format (quant type, blocksize, bits)")


def parse(config_dict: dict) -> LoRAConfig:
    return LoRAConfig.from_peft_dict(config_dict)


def save_plan(model: nn.Module, adapter_name: str, config: LoRAConfig,
              convert_to_lora: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """(live tensors by file key, the config as JSON) of one adapter."""
    live = adapter_tensors(model, adapter_name, config)
    if convert_to_lora and rewrites_base(config.init):
        live, config = _converted_to_lora(model, adapter_name, config, live)
    return {PREFIX + k: t for k, t in live.items()}, config.to_peft_dict()


def load(model: nn.Module, config: LoRAConfig, found: dict[str, torch.Tensor], directory: Path,
         adapter_name: str, is_trainable: bool, rewritten_base: bool) -> list[str]:
    """Put the file's adapter on the model as `adapter_name` (see `lora.files.load_adapter`)."""
    if adapter_name in get_state(model, BOTTLENECK_CONFIGS):
        raise ValueError(f"adapter_name {adapter_name!r} is a bottleneck adapter of this model; "
                         "a LoRA adapter of that name would overwrite its files (use another adapter_name)")
    _check_ranks(model, config, found, directory)
    _check_base_matches(config, rewritten_base, directory)
    if adapter_name in get_state(model, LORA_CONFIGS):
        _check_existing(model, adapter_name, config, directory)
        expected = _expected(model, adapter_name, config, found, directory)
        check_fit(expected, found, directory)
    else:
        _check_targets_have_tensors(model, config, found, directory)
        expected = _trial_apply(model, config, adapter_name, is_trainable, found, directory)
    # Every check has passed: from here on nothing fails, so the model changes all at once.
    copy_into(expected, found)
    own = adapter_tensors(model, adapter_name, config)
    warn_replaced([k for k in expected if k not in own], directory)
    paths = []
    for path, layer in lora_layers(model):
        if adapter_name in layer.r:
            _, alpha = config.rank_and_alpha(pattern_name(path, layer))
            layer.set_scale(adapter_name, alpha, config.rslora)
            paths.append(path)
    _store_config(model, adapter_name, config, paths)
    return paths
