"""Adapter files in the layout Hugging Face PEFT reads and writes.

One adapter = one folder with `adapter_config.json` and `adapter_model.safetensors`.
Keys are `base_model.model.<module path>.<param>` with the adapter name left out, e.g.
`base_model.model.h.0.attn.c_attn.lora_A.weight`, `...wte.lora_embedding_A`,
`...c_attn.base_layer.bias` (bias="lora_only"), `...ln_f.weight` (modules_to_save),
`...c_attn.lora_magnitude_vector` (DoRA's m, as PEFT writes it).
The adapter "default" goes in the folder itself, any other adapter in a sub-folder of
its name (PEFT's `save_pretrained` rule). Adapter names are one safe path component
(`check_adapter_name`) and every folder must resolve inside `directory`.

One module per format, each with `parse`, `save_plan` and `load`: `lora_format` (peft_type
LORA), `bottleneck` (BOTTLENECK), `prompt` (PROMPT_TUNING); `folder` writes and reads the
two files of any of them and `checks` vets what was read. A model may carry all three at
once: `save_adapter` writes every adapter it has, the prompt as the adapter "default".

Crash safety: each file is replaced atomically (`quant.atomic_file`: temp file in the same
folder, fsync, `os.replace`), weights first, config second. The weights file carries the config text it
was saved with, and the hash of the config it replaces, in its safetensors metadata, so
a save killed between the two renames leaves (new weights, old config): `read_adapter`
recognises the stale config by its hash and uses the embedded one. A folder therefore
always reads as the previous complete adapter or the new one.

Concurrency: a save holds an exclusive `flock` on `<folder>/.lock` and a read a shared
one, so two saves never interleave their files and a read never sees half of a save
(the kernel drops the lock of a killed process). A read takes both files into memory
once, under the lock, and re-reads the config afterwards to catch writers that do not
lock (e.g. PEFT itself).

What is loaded is what `adapter_config.json` says. The embedded config only stands in
for it in the interrupted-save case above; any other disagreement between the two files
is an error, never a silent choice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from quant.atomic_file import atomic_write

from ..adapters import AdapterConfig
from ..config import LoRAConfig, check_adapter_name, check_flag
from ..inject import lora_layers
from ..layer import adapter_name_list
from ..model_state import BOTTLENECK_CONFIGS, LORA_CONFIGS, get_state
from . import bottleneck, lora_format, prompt
from .bottleneck import bottleneck_tensors
from .checks import MAX_JSON_DEPTH, parse_json_object
from .folder import (
    BIN_WEIGHTS_NAME,
    CONFIG_NAME,
    LOCK_NAME,
    MAX_CONFIG_BYTES,
    META_BASE,
    META_CONFIG,
    META_REPLACES,
    PREFIX,
    READ_ATTEMPTS,
    WEIGHTS_NAME,
    adapter_folder,
    check_directory,
    folder_lock,
    read_folder,
    write_folder,
)
from .lora_format import adapter_tensors
from .prompt import PROMPT_NAME, find_prompt

# peft_type in adapter_config.json -> the module that parses, saves and loads it
FORMATS = {m.PEFT_TYPE: m for m in (lora_format, bottleneck, prompt)}

__all__ = [
    "BIN_WEIGHTS_NAME", "CONFIG_NAME", "FORMATS", "LOCK_NAME", "MAX_CONFIG_BYTES", "MAX_JSON_DEPTH", "META_BASE", "META_CONFIG", "META_REPLACES",
    "PREFIX", "READ_ATTEMPTS", "WEIGHTS_NAME", "adapter_folder", "adapter_tensors", "atomic_write",
    "bottleneck_tensors", "find_prompt", "folder_lock", "load_adapter", "parse_json_object", "read_adapter",
    "save_adapter",
]


def _all_configs(model: nn.Module) -> dict:
    """{adapter name: LoRAConfig, AdapterConfig or the PromptTuning} of every adapter on the
    model; the prompt counts as the adapter PROMPT_NAME. Names used twice are refused: their
    files would overwrite each other."""
    configs = dict(get_state(model, LORA_CONFIGS))
    kinds = [("LoRA", configs), ("bottleneck", get_state(model, BOTTLENECK_CONFIGS))]
    found = find_prompt(model)
    if found is not None:
        kinds.append(("prompt-tuning", {PROMPT_NAME: found}))
    out: dict = {}
    for i, (kind, named) in enumerate(kinds):
        for other, before in kinds[:i]:
            clash = sorted(set(named) & set(before))
            if clash:
                raise ValueError(f"adapter names {clash} are used by both {other} and {kind} adapters; "
                                 "their files would overwrite each other (use another adapter_name"
                                 + (f"; a prompt is always the adapter {PROMPT_NAME!r}" if kind == "prompt-tuning"
                                    else "") + ")")
        out.update(named)
    _check_no_hidden_adapters(model, out)
    return out


def _check_no_hidden_adapters(model: nn.Module, configs: dict) -> None:
    """LoRA layers whose adapter has no config on `model` (apply_lora was called on a
    submodule) would be left out of the files without a word: refused instead."""
    hidden = sorted({(path, name) for path, layer in lora_layers(model) for name in layer.r if name not in configs})
    if hidden:
        owners = [n for n, m in model.named_modules() if n and get_state(m, LORA_CONFIGS)]
        where = f"; apply_lora was called on submodule(s) {owners}: save those" if owners else ""
        raise ValueError(f"LoRA adapters {hidden} (path, adapter name) are not recorded on this model, so "
                         f"save_adapter cannot write them{where}, or apply_lora to the model you save")


def _save_names(adapter_names, configs: dict) -> list[str]:
    """The adapters to save: all of them, or the given name(s), each checked."""
    if adapter_names is None:
        names = list(configs)
        for name in names:
            check_adapter_name(name, "adapter_names")
    else:
        names = adapter_name_list(adapter_names, "adapter_names", allow_empty=True)
    names = list(dict.fromkeys(names))  # each folder once
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"adapter_names {unknown} not found; the model has {sorted(configs)}")
    return names


def _plan(model: nn.Module, name: str, config,
          convert_to_lora: bool) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """(tensors by file key, config JSON, extra file metadata) of one adapter, by its format."""
    if isinstance(config, prompt.PromptTuning):
        return (*prompt.save_plan(model, config), {})
    if isinstance(config, AdapterConfig):
        return (*bottleneck.save_plan(model, name, config, convert_to_lora), {})
    formats = json.dumps(lora_format.base_formats(model, name), sort_keys=True)
    return (*lora_format.save_plan(model, name, config, convert_to_lora), {META_BASE: formats})


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_names: list[str] | None = None,
                 convert_to_lora: bool = False) -> list[Path]:
    """Write each adapter's `adapter_config.json` and `adapter_model.safetensors` (atomically).

    LoRA / DoRA adapters and bottleneck adapters (`add_adapters`) are saved per adapter
    name; a model's `PromptTuning` is saved as PEFT's PROMPT_TUNING under the adapter name
    "default" (so a LoRA adapter on the same model needs another name).
    Returns the folders written ("default" in `directory`, others in `directory/<name>`).
    Every name, folder and tensor is checked before the first file is written.

    `convert_to_lora=True` writes adapters started by PiSSA / OLoRA (which rewrote the base)
    as plain LoRA adapters of rank 2r for the *original* base (`_converted_to_lora`; PEFT's
    `path_initial_model_for_weight_conversion`), using the initial factors the layers kept
    at init. Without it such an adapter is saved as trained, with `init_lora_weights`
    recording the init, and `load_adapter` refuses to put it on an original base. A LoftQ
    adapter cannot be converted (ValueError); other adapters are saved unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_flag("convert_to_lora", convert_to_lora)
    directory = check_directory(directory)
    configs = _all_configs(model)
    if not configs:
        raise ValueError("model has no LoRA adapters (nor bottleneck adapters or a prompt) to save; "
                         "call apply_lora, add_adapters or load_adapter first")
    plan = []
    for name in _save_names(adapter_names, configs):
        plan.append((name, *_plan(model, name, configs[name], convert_to_lora)))
    for name, *_ in plan:
        adapter_folder(directory, name)  # every folder checked before the first write
    written = []
    for name, tensors, config, metadata in plan:
        folder = adapter_folder(directory, name)  # again: a symlink may have been planted meanwhile
        write_folder(folder, tensors, config, metadata)
        written.append(folder)
    return written


def _parse_config(config_dict: dict, path: Path) -> LoRAConfig | AdapterConfig | dict:
    """The typed config of one peft_type; errors are re-raised naming the file."""
    fmt = FORMATS.get(config_dict.get("peft_type", "LORA"), lora_format)  # LoRAConfig names a wrong peft_type
    try:
        return fmt.parse(config_dict)
    except (TypeError, ValueError) as err:
        message = str(err).removeprefix(f"{CONFIG_NAME}: ")
        raise type(err)(f"{path}: {message}") from None


def read_adapter(directory: str | os.PathLike) -> tuple[LoRAConfig | AdapterConfig | dict, dict[str, torch.Tensor]]:
    """Read one adapter folder: (config, tensors by file key without PREFIX).

    The config is a `LoRAConfig` (peft_type LORA), an `AdapterConfig` (BOTTLENECK) or, for
    PROMPT_TUNING, the JSON dict itself. Both files are read once, under the folder's shared
    lock; the config is validated (types, regexes, size, nesting) and the tensors are checked
    to be floating point and finite. Any problem is a ValueError naming the file."""
    config, tensors, _ = read_folder(check_directory(directory), _parse_config)
    return config, tensors


def _format_of(config) -> object:
    if isinstance(config, dict):
        return prompt
    return bottleneck if isinstance(config, AdapterConfig) else lora_format


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False, rewritten_base: bool = False) -> list[str]:
    """Load an adapter folder (ours or one written by PEFT for the same model).

    If the model has no adapter called `adapter_name`, it is added first (as `apply_lora`
    with the file's config); then the whole model is frozen unless `is_trainable`. An
    existing adapter takes the file's weights, scaling and config (a later `save_adapter`
    writes what was loaded).

    Everything is checked before the model changes: the name, the config (types, regexes),
    every tensor's key, shape, dtype and finiteness. On any problem a ValueError (or
    TypeError) names it and the model is left exactly as it was.

    Bottleneck-adapter folders go through `add_adapters` the same way; a PROMPT_TUNING
    folder needs a model holding a `PromptTuning` of the same size.

    A file whose `init_lora_weights` is PiSSA / OLoRA / LoftQ was trained on a rewritten base
    and is refused unless `rewritten_base=True` says this model's base holds those rewritten
    weights (a load never rewrites the base itself). Files this library saved record each
    layer's base format (4-bit format tag or dense); such an adapter is also refused when a
    layer's base here has another format (an NF3 LoftQ adapter on an NF4 LoftQ base).

    Returns the qualified names of the layers that carry the adapter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_adapter_name(adapter_name)
    check_flag("is_trainable", is_trainable)
    check_flag("rewritten_base", rewritten_base)
    directory = check_directory(directory)
    config, found, metadata = read_folder(directory, _parse_config)
    if isinstance(config, LoRAConfig):
        lora_format.check_base_formats(model, config, metadata, directory, rewritten_base)
    return _format_of(config).load(model, config, found, directory, adapter_name, is_trainable, rewritten_base)
