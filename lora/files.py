"""Adapter files in the layout Hugging Face PEFT reads and writes.

One adapter = one folder with `adapter_config.json` and `adapter_model.safetensors`.
Keys are `base_model.model.<module path>.<param>` with the adapter name left out, e.g.
`base_model.model.h.0.attn.c_attn.lora_A.weight`, `...wte.lora_embedding_A`,
`...c_attn.base_layer.bias` (bias="lora_only"), `...ln_f.weight` (modules_to_save),
`...c_attn.lora_magnitude_vector` (DoRA's m, as PEFT writes it).
The adapter "default" goes in the folder itself, any other adapter in a sub-folder of
its name (PEFT's `save_pretrained` rule).

Crash safety: each file is replaced atomically (temp file in the same folder, fsync,
`os.replace`), weights first, config second. The weights file carries the config text it
was saved with, and the hash of the config it replaces, in its safetensors metadata, so
a save killed between the two renames leaves (new weights, old config): `read_adapter`
recognises the stale config by its hash and uses the embedded one. A folder therefore
always reads as the previous complete adapter or the new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .adapters import BOTTLENECK_ATTR, AdapterConfig, adapter_modules, add_adapters, remove_adapters
from .config import LoRAConfig
from .inject import CONFIG_ATTR, apply_lora, lora_layers, modules_to_save_names
from .prompt_tuning import PromptTuning, prompt_config

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
META_CONFIG = "loralab.adapter_config"  # safetensors metadata: the config text saved with these weights
META_REPLACES = "loralab.replaces_config_sha256"  # ... and the hash of the config.json it replaced


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
    for name in modules_to_save_names(model, config):
        for key, t in model.get_submodule(name).state_dict(keep_vars=True).items():
            out[f"{name}.{key}"] = t
    return out


def _default_mode() -> int:
    """The permissions `open()` would give a new file (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Create or replace `path` atomically: `write(tmp)` fills a temp file in the same
    folder, which is synced to disk and renamed over `path`. Readers see the old file or
    the new one, never a half-written one. The file gets the usual permissions."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())  # mkstemp creates owner-only files
        with open(tmp, "rb") as f:  # on disk before the rename, so a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _adapter_dir(directory: Path, adapter_name: str) -> Path:
    return directory if adapter_name == "default" else directory / adapter_name


def bottleneck_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors of the bottleneck adapters, by file key (`<path>.adapter.down.weight`, ...)."""
    return {f"{path}.adapter.{key}": t for path, adapter in adapter_modules(model).items()
            for key, t in adapter.state_dict(keep_vars=True).items()}


def find_prompt(model: nn.Module) -> PromptTuning | None:
    """The `PromptTuning` of a model (itself, or its only PromptTuning submodule)."""
    found = [m for m in model.modules() if isinstance(m, PromptTuning)]
    if len(found) > 1:
        raise ValueError(f"model has {len(found)} PromptTuning modules; save or load them one at a time")
    return found[0] if found else None


def _all_configs(model: nn.Module) -> dict:
    """{adapter name: LoRAConfig or AdapterConfig} of every adapter on the model."""
    configs = dict(getattr(model, CONFIG_ATTR, None) or {})
    bottleneck = getattr(model, BOTTLENECK_ATTR, None) or {}
    clash = sorted(set(configs) & set(bottleneck))
    if clash:
        raise ValueError(f"adapter names {clash} are used by both LoRA and bottleneck adapters; "
                         "their files would overwrite each other (use another adapter_name)")
    return {**configs, **bottleneck}


def _write_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Weights then config, each atomically, with the crash-safety metadata (module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    old_config = folder / CONFIG_NAME
    metadata = {"format": "pt", META_CONFIG: config_text,
                META_REPLACES: _sha256(old_config.read_bytes()) if old_config.is_file() else ""}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text))


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_names: list[str] | None = None) -> list[Path]:
    """Write each adapter's `adapter_config.json` and `adapter_model.safetensors` (atomically).

    LoRA / DoRA adapters and bottleneck adapters (`add_adapters`) are saved per adapter
    name; a model with a `PromptTuning` is saved as PEFT's PROMPT_TUNING (one folder).
    Returns the folders written ("default" in `directory`, others in `directory/<name>`).
    """
    prompt = find_prompt(model)
    if prompt is not None:
        _write_folder(Path(directory), {"prompt_embeddings": prompt.prompt_embeddings},
                      prompt_config(prompt, getattr(model, "model", model)))
        return [Path(directory)]
    configs = _all_configs(model)
    if not configs:
        raise ValueError("model has no LoRA adapters (nor bottleneck adapters or a prompt) to save; "
                         "call apply_lora, add_adapters or load_adapter first")
    names = list(configs) if adapter_names is None else list(adapter_names)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"adapter_names {unknown} not found; the model has {sorted(configs)}")
    written = []
    for name in names:
        folder = _adapter_dir(Path(directory), name)
        config = configs[name]
        live = bottleneck_tensors(model) if isinstance(config, AdapterConfig) else adapter_tensors(model, name, config)
        _write_folder(folder, {PREFIX + k: t for k, t in live.items()}, config.to_peft_dict())
        written.append(folder)
    return written


def read_adapter(directory: str | os.PathLike) -> tuple[LoRAConfig | AdapterConfig | dict, dict[str, torch.Tensor]]:
    """Read one adapter folder: (config, tensors by file key without PREFIX).

    The config is a `LoRAConfig` (peft_type LORA), an `AdapterConfig` (BOTTLENECK) or, for
    PROMPT_TUNING, the JSON dict itself."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found")
    config_bytes = (directory / CONFIG_NAME).read_bytes()
    try:
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
            metadata = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"directory: {directory / WEIGHTS_NAME} is not a readable safetensors file "
                         f"(corrupt or truncated?): {err}") from err
    embedded = metadata.get(META_CONFIG)
    if embedded is not None and embedded.encode() != config_bytes and metadata.get(META_REPLACES) == _sha256(config_bytes):
        warnings.warn(f"{directory / CONFIG_NAME} predates the weights (a save was interrupted); "
                      "using the config saved inside the weights file", stacklevel=2)
        config_bytes = embedded.encode()
    try:
        config_dict = json.loads(config_bytes)
    except ValueError as err:  # JSONDecodeError or bad UTF-8
        raise ValueError(f"directory: {directory / CONFIG_NAME} is not valid JSON: {err}") from err
    if not isinstance(config_dict, dict):
        raise ValueError(f"directory: {directory / CONFIG_NAME} must hold a JSON object, got {type(config_dict).__name__}")
    kind = config_dict.get("peft_type", "LORA")
    if kind == "BOTTLENECK":
        config = AdapterConfig.from_peft_dict(config_dict)
    elif kind == "PROMPT_TUNING":
        config = config_dict
    else:
        config = LoRAConfig.from_peft_dict(config_dict)
    tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}
    # DoRA magnitudes: PEFT writes `...lora_magnitude_vector`; accept the in-memory `....weight` too
    tensors = {k[:-len(".weight")] if k.endswith("lora_magnitude_vector.weight") else k: v for k, v in tensors.items()}
    return config, tensors


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _snapshot(model: nn.Module) -> dict:
    return {"layers": {n: (layer, list(layer.r), list(layer.active_adapters)) for n, layer in lora_layers(model)},
            "grad": {id(p): p.requires_grad for p in model.parameters()},
            "configs": dict(getattr(model, CONFIG_ATTR, None) or {})}


def _restore(model: nn.Module, snap: dict) -> None:
    for name, layer in list(lora_layers(model)):
        if name not in snap["layers"]:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
            continue
        _, names, active = snap["layers"][name]
        for extra in [n for n in layer.r if n not in names]:
            layer.delete_adapter(extra)
        layer.active_adapters = active
    for p in model.parameters():
        if id(p) in snap["grad"]:
            p.requires_grad_(snap["grad"][id(p)])
    if snap["configs"]:
        setattr(model, CONFIG_ATTR, snap["configs"])
    elif hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)


def _check(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], directory: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong shapes {wrong}")
    if problems:
        raise ValueError(f"adapter in {directory} does not fit the model: " + "; ".join(problems))


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> list[str]:
    """Load an adapter folder (ours or one written by PEFT for the same model).

    If the model has no adapter called `adapter_name`, it is added first (as `apply_lora`
    with the file's config); then the whole model is frozen unless `is_trainable`. Keys and shapes are checked before anything is copied; on
    any mismatch a ValueError names the keys and the model is left as it was.

    Bottleneck-adapter folders go through `add_adapters` the same way; a PROMPT_TUNING
    folder needs a model holding a `PromptTuning` of the same size.

    Returns the qualified names of the layers that carry the adapter.
    """
    directory = Path(directory)
    config, found = read_adapter(directory)
    if isinstance(config, dict):
        return _load_prompt(model, config, found, directory)
    if isinstance(config, AdapterConfig):
        return _load_bottleneck(model, config, found, directory, adapter_name, is_trainable)
    snap = _snapshot(model)
    try:
        if adapter_name not in snap["configs"]:
            apply_lora(model, config, adapter_name=adapter_name)
            if not is_trainable:  # inference, as PEFT's from_pretrained: everything frozen
                model.requires_grad_(False)
        merged = [path for path, layer in lora_layers(model) if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged in {merged}; unmerge() before loading")
        expected = adapter_tensors(model, adapter_name, config)
        _check(expected, found, directory)
    except BaseException:
        _restore(model, snap)
        raise
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(found[key])
    names = []
    for path, layer in lora_layers(model):
        if adapter_name in layer.r:
            _, alpha = config.rank_and_alpha(path)
            layer.set_scale(adapter_name, alpha, config.rslora)
            names.append(path)
    return names


def _load_bottleneck(model: nn.Module, config: AdapterConfig, found: dict, directory: Path,
                     adapter_name: str, is_trainable: bool) -> list[str]:
    existing = getattr(model, BOTTLENECK_ATTR, None) or {}
    if existing and adapter_name not in existing:
        raise ValueError(f"model already has bottleneck adapters {sorted(existing)}; one set per model")
    grad = {id(p): p.requires_grad for p in model.parameters()}
    added = not existing
    try:
        if added:
            add_adapters(model, config, adapter_name=adapter_name)
            if not is_trainable:
                model.requires_grad_(False)
        expected = bottleneck_tensors(model)
        _check(expected, found, directory)
    except BaseException:
        if added:
            remove_adapters(model)
            for p in model.parameters():
                p.requires_grad_(grad.get(id(p), p.requires_grad))
        raise
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(found[key])
    return list(adapter_modules(model))


def _load_prompt(model: nn.Module, config: dict, found: dict, directory: Path) -> list[str]:
    prompt = find_prompt(model)
    if prompt is None:
        raise ValueError(f"{directory} holds a PROMPT_TUNING adapter; load it into a model with a PromptTuning "
                         "(add_prompt_tuning(model, num_virtual_tokens=...))")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise ValueError("adapter_config.json: num_transformer_submodules must be 1 (decoder-only models)")
    _check({"prompt_embeddings": prompt.prompt_embeddings}, found, directory)
    with torch.no_grad():
        prompt.prompt_embeddings.copy_(found["prompt_embeddings"])
    return ["prompt_embeddings"]
