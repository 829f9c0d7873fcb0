"""Adapter files in the layout Hugging Face PEFT reads and writes.

One adapter = one folder with `adapter_config.json` and `adapter_model.safetensors`.
Keys are `base_model.model.<module path>.<param>` with the adapter name left out, e.g.
`base_model.model.h.0.attn.c_attn.lora_A.weight`, `...wte.lora_embedding_A`,
`...c_attn.base_layer.bias` (bias="lora_only"), `...ln_f.weight` (modules_to_save),
`...c_attn.lora_magnitude_vector` (DoRA's m, as PEFT writes it).
The adapter "default" goes in the folder itself, any other adapter in a sub-folder of
its name (PEFT's `save_pretrained` rule). Adapter names are one safe path component
(`check_adapter_name`) and every folder must resolve inside `directory`.

Crash safety: each file is replaced atomically (temp file in the same folder, fsync,
`os.replace`), weights first, config second. The weights file carries the config text it
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

import copy
import dataclasses
import hashlib
import json
import math
import os
import secrets
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from .adapters import BOTTLENECK_ATTR, AdapterConfig, adapter_modules, add_adapters, remove_adapters
from .config import ALL_LINEAR, LoRAConfig, check_adapter_name, check_flag, rewrites_base
from .inject import (
    CONFIG_ATTR,
    apply_lora,
    lora_layers,
    modules_to_save_names,
    replace_module,
    resolve_targets,
)
from .layer import adapter_name_list
from .prompt_tuning import PromptTuning, check_prompt_config, prompt_config

try:
    import fcntl
except ImportError:  # not POSIX: saves and reads run without the folder lock
    fcntl = None

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LOCK_NAME = ".lock"  # flock target inside each adapter folder (see module docstring)
PREFIX = "base_model.model."
META_CONFIG = "loralab.adapter_config"  # safetensors metadata: the config text saved with these weights
META_REPLACES = "loralab.replaces_config_sha256"  # ... and the hash of the config.json it replaced
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is a few KiB; more is a broken or hostile file
MAX_JSON_DEPTH = 32  # PEFT configs nest 3 levels; deep nesting would only reach Python's recursion limit
READ_ATTEMPTS = 3  # re-reads when a writer that does not lock changes the folder under a read


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


# ----- low-level file handling: atomic writes, the folder lock, guarded reads -----

def atomic_write(path: str | os.PathLike, write) -> None:
    """Create or replace `path` atomically: `write(tmp)` fills a temp file in the same
    folder, which is synced to disk and renamed over `path`. Readers see the old file or
    the new one, never a half-written one.

    The temp file is created with mode 0o666 and O_EXCL under a random name, so the kernel
    applies the process umask (as for `open()`) and the umask itself is never changed:
    changing it, even for a moment, would affect files other threads create meanwhile."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 less the umask, as the kernel applied it
    os.close(fd)
    try:
        write(str(tmp))
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # the writer replaced our file (safetensors
            os.chmod(tmp, mode)                         # writes its own owner-only temp file and renames it)
        with open(tmp, "rb") as f:  # on disk before the rename, so a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; some file systems cannot sync a directory, which is harmless here."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_lock(folder: Path, exclusive: bool) -> int | None:
    """A file descriptor of `<folder>/.lock`: a saver creates it, a reader only opens it.

    A reader never writes into the folder it reads (a PEFT or hub cache folder stays as it
    was); where no lock file exists, no loralab save has ever run there, and a save that
    starts during the read is caught by the config re-check after reading (`read_adapter`).
    """
    path = folder / LOCK_NAME
    flags = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)  # never follow a planted symlink
    if exclusive:
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666)
    try:
        return os.open(path, os.O_RDONLY | flags)
    except FileNotFoundError:
        return None


@contextmanager
def folder_lock(folder: str | os.PathLike, exclusive: bool):
    """Hold `flock` on `<folder>/.lock`: exclusive for a save, shared for a read."""
    fd = _open_lock(Path(folder), exclusive) if fcntl is not None else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _read_config_bytes(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes; not an adapter config")
    return data


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


def _safetensors_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file held in memory (8-byte header length, JSON header)."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if size < 2 or 8 + size > len(data):
        raise ValueError(f"directory: {path} is not a readable safetensors file (corrupt or truncated?)")
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"directory: {path} is not a readable safetensors file (bad header)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"directory: {path}: safetensors __metadata__ must map strings to strings")
    return metadata


def _load_tensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, RuntimeError, ValueError, TypeError, OverflowError) as err:
        raise ValueError(f"directory: {path} is not a readable safetensors file (corrupt or truncated?): {err}") from None


# ----- saving -----

def _check_directory(directory) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    return Path(directory)


def adapter_folder(directory: str | os.PathLike, adapter_name: str) -> Path:
    """Where `save_adapter` puts an adapter: `directory` for "default", else `directory/<adapter_name>`.

    The name must be one safe path component and the folder must resolve inside
    `directory`, so neither a name nor a symlinked sub-folder can send the files elsewhere."""
    check_adapter_name(adapter_name, "adapter_names")
    directory = Path(directory)
    folder = directory if adapter_name == "default" else directory / adapter_name
    resolved, root = folder.resolve(), directory.resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"adapter_names: the folder of {adapter_name!r} ({folder}) resolves to {resolved}, "
                         f"outside directory {root} (a symlink?); refusing to write there")
    return folder


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
    """Weights then config, each atomically, under the folder's exclusive lock, with the
    crash-safety metadata (module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    with folder_lock(folder, exclusive=True):
        _remove_stale_temps(folder)
        old_config = folder / CONFIG_NAME
        metadata = {"format": "pt", META_CONFIG: config_text,
                    META_REPLACES: _sha256(old_config.read_bytes()) if old_config.is_file() else ""}
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text))


def _remove_stale_temps(folder: Path) -> None:
    """Temp files left by saves that were killed (`.<file name>.<random>.tmp`, see `atomic_write`).
    Called under the exclusive lock, when no save of ours can be writing one."""
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        for stale in folder.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


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


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_names: list[str] | None = None,
                 convert_to_lora: bool = False) -> list[Path]:
    """Write each adapter's `adapter_config.json` and `adapter_model.safetensors` (atomically).

    LoRA / DoRA adapters and bottleneck adapters (`add_adapters`) are saved per adapter
    name; a model with a `PromptTuning` is saved as PEFT's PROMPT_TUNING (one folder).
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
    directory = _check_directory(directory)
    prompt = find_prompt(model)
    if prompt is not None:
        plan = [("default", {"prompt_embeddings": prompt.prompt_embeddings},
                 prompt_config(prompt, getattr(model, "model", model)))]
    else:
        configs = _all_configs(model)
        if not configs:
            raise ValueError("model has no LoRA adapters (nor bottleneck adapters or a prompt) to save; "
                             "call apply_lora, add_adapters or load_adapter first")
        plan = []
        for name in _save_names(adapter_names, configs):
            config = configs[name]
            live = bottleneck_tensors(model) if isinstance(config, AdapterConfig) else adapter_tensors(model, name, config)
            if convert_to_lora and isinstance(config, LoRAConfig) and rewrites_base(config.init):
                live, config = _converted_to_lora(model, name, config, live)
            plan.append((name, {PREFIX + k: t for k, t in live.items()}, config.to_peft_dict()))
    for name, _, _ in plan:
        adapter_folder(directory, name)  # every folder checked before the first write
    written = []
    for name, tensors, config in plan:
        folder = adapter_folder(directory, name)  # again: a symlink may have been planted meanwhile
        _write_folder(folder, tensors, config)
        written.append(folder)
    return written


# ----- reading -----

def _read_files(directory: Path) -> tuple[bytes | None, bytes]:
    """(config bytes, weights bytes) of one consistent moment: read under the shared lock,
    and the config read again afterwards in case a writer that does not lock was busy.
    The config is None when the file is missing (see `_config_of`)."""
    with folder_lock(directory, exclusive=False):
        for _ in range(READ_ATTEMPTS):
            config_bytes = _read_config_bytes(directory / CONFIG_NAME)
            weights_bytes = (directory / WEIGHTS_NAME).read_bytes()
            if _read_config_bytes(directory / CONFIG_NAME) == config_bytes:
                return config_bytes, weights_bytes
    raise ValueError(f"directory: {directory / CONFIG_NAME} changed during each of {READ_ATTEMPTS} reads; "
                     "another program is writing this adapter without locking it")


def _embedded_config(metadata: dict[str, str], directory: Path) -> dict | None:
    """The config a loralab save stored inside the weights (None for files PEFT wrote)."""
    text = metadata.get(META_CONFIG)
    if text is None:
        return None
    return parse_json_object(text.encode(), f"directory: {directory / WEIGHTS_NAME} (metadata {META_CONFIG})")


def _check_same_config(on_disk: dict, embedded: dict | None, directory: Path) -> None:
    """`adapter_config.json` must be the config the weights were saved with."""
    if embedded is None or embedded == on_disk:
        return
    changed = sorted(k for k in set(on_disk) | set(embedded) if on_disk.get(k) != embedded.get(k))
    raise ValueError(f"{directory / CONFIG_NAME} does not match the config {directory / WEIGHTS_NAME} was saved "
                     f"with (fields {changed}), and it is not the config that save replaced: the folder mixes two "
                     "adapters, or the config was edited by hand. Save the adapter again (a hand edit must "
                     f"be made before saving, or the weights re-saved without the {META_CONFIG!r} metadata)")


def _parse_config(config_dict: dict, path: Path) -> LoRAConfig | AdapterConfig | dict:
    """The typed config of one peft_type; errors are re-raised naming the file."""
    kind = config_dict.get("peft_type", "LORA")
    try:
        if kind == "BOTTLENECK":
            return AdapterConfig.from_peft_dict(config_dict)
        if kind == "PROMPT_TUNING":
            return config_dict  # checked against the model's PromptTuning by load_adapter
        return LoRAConfig.from_peft_dict(config_dict)
    except (TypeError, ValueError) as err:
        message = str(err).removeprefix(f"{CONFIG_NAME}: ")
        raise type(err)(f"{path}: {message}") from None


def _is_adapter_key(key: str) -> bool:
    """A key that holds adapter weights proper (not a modules_to_save buffer, which may be an int)."""
    return "lora_" in key or ".adapter." in key or key == "prompt_embeddings" or key.endswith("base_layer.bias")


def _all_finite(t: torch.Tensor) -> bool:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.float()  # e.g. float8, which has no isfinite kernel everywhere
    return bool(torch.isfinite(t).all())


def _check_values(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Adapter weights are floating point and finite: an int8 / bool tensor or a NaN would
    load into the float parameters without complaint and give wrong outputs."""
    for key, t in tensors.items():
        if t.is_floating_point():
            if not _all_finite(t):
                raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values")
        elif _is_adapter_key(key):
            raise ValueError(f"{path}: tensor {key!r} has dtype {t.dtype}; adapter weights must be floating point")


def _strip_keys(raw: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """File keys without PREFIX; DoRA magnitudes by PEFT's key (`...lora_magnitude_vector`, also
    accepted as `....weight`). Two file keys that name the same tensor are refused."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        short = key[len(PREFIX):] if key.startswith(PREFIX) else key
        short = short[:-len(".weight")] if short.endswith("lora_magnitude_vector.weight") else short
        if short in tensors:
            raise ValueError(f"{path}: two tensors are stored for {short!r} (with and without {PREFIX!r})")
        tensors[short] = value
    return tensors


def read_adapter(directory: str | os.PathLike) -> tuple[LoRAConfig | AdapterConfig | dict, dict[str, torch.Tensor]]:
    """Read one adapter folder: (config, tensors by file key without PREFIX).

    The config is a `LoRAConfig` (peft_type LORA), an `AdapterConfig` (BOTTLENECK) or, for
    PROMPT_TUNING, the JSON dict itself. Both files are read once, under the folder's shared
    lock; the config is validated (types, regexes, size, nesting) and the tensors are checked
    to be floating point and finite. Any problem is a ValueError naming the file."""
    directory = _check_directory(directory)
    if not (directory / WEIGHTS_NAME).is_file():  # (a missing config alone may be an interrupted first save)
        missing = CONFIG_NAME if not (directory / CONFIG_NAME).is_file() else WEIGHTS_NAME
        raise FileNotFoundError(f"{directory / missing} not found")
    config_bytes, weights_bytes = _read_files(directory)
    metadata = _safetensors_metadata(weights_bytes, directory / WEIGHTS_NAME)
    raw = _load_tensors(weights_bytes, directory / WEIGHTS_NAME)
    config = _config_of(config_bytes, metadata, directory)
    tensors = _strip_keys(raw, directory / WEIGHTS_NAME)
    _check_values(tensors, directory / WEIGHTS_NAME)
    return config, tensors


def _config_of(config_bytes: bytes | None, metadata: dict[str, str], directory: Path):
    """The typed config the weights go with: what `adapter_config.json` says, or the config
    embedded in the weights in exactly one case, a save killed between its two renames:
    then the config on disk is the one that save replaced (hash in META_REPLACES; "" and no
    config file for a first save)."""
    embedded = _embedded_config(metadata, directory)
    replaced = metadata.get(META_REPLACES)
    if config_bytes is None:
        if embedded is None or replaced != "":
            raise FileNotFoundError(f"{directory / CONFIG_NAME} not found")
    else:
        on_disk = parse_json_object(config_bytes, f"directory: {directory / CONFIG_NAME}")
        if embedded is None or embedded == on_disk or replaced != _sha256(config_bytes):
            config = _parse_config(on_disk, directory / CONFIG_NAME)  # field errors first: they say most
            _check_same_config(on_disk, embedded, directory)
            return config
    warnings.warn(f"{directory / CONFIG_NAME} predates the weights (a save was interrupted); "
                  "using the config saved inside the weights file", stacklevel=3)
    return _parse_config(embedded, directory / WEIGHTS_NAME)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----- loading into a model: every check first, then one change -----

_FACTOR_RANK_DIM = {".lora_A.weight": 0, ".lora_B.weight": 1, ".lora_embedding_A": 0, ".lora_embedding_B": 1}


def _check_targets_have_tensors(model: nn.Module, config: LoRAConfig, found: dict[str, torch.Tensor],
                                directory: Path) -> None:
    """Every module the config targets has tensors in the file, before layers are built for
    them (a rank_pattern could otherwise ask for a huge layer the file does not even hold)."""
    empty = [path for path in resolve_targets(model, config)
             if not any(key.startswith(path + ".") for key in found)]
    if empty:
        raise ValueError(f"adapter in {directory} does not fit the model: missing keys for {empty} "
                         f"(its {CONFIG_NAME} targets them, its weights do not hold them)")


def _check_ranks(config: LoRAConfig, found: dict[str, torch.Tensor], directory: Path) -> None:
    """Each A / B factor in the file has the rank the config gives its layer (before any
    layer of that rank is built)."""
    for key, t in found.items():
        for suffix, dim in _FACTOR_RANK_DIM.items():
            if key.endswith(suffix):
                path = key[:-len(suffix)]
                r, _ = config.rank_and_alpha(path)
                if t.dim() != 2 or t.shape[dim] != r:
                    raise ValueError(f"adapter in {directory} has wrong shapes for its {CONFIG_NAME}: tensor "
                                     f"{key!r} is {tuple(t.shape)} but the config gives {path} rank r={r}")


def _check(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], directory: Path) -> None:
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


def _copy(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(found[key])


def _snapshot(model: nn.Module) -> dict:
    """What `apply_lora` may change, to undo a trial that fails its checks."""
    configs = getattr(model, CONFIG_ATTR, None)
    return {"layers": {n: (layer, list(layer.r), list(layer.active_adapters), list(getattr(layer, "tied_with", [])))
                       for n, layer in lora_layers(model)},
            "grad": {id(p): p.requires_grad for p in model.parameters()},
            "configs": configs, "config_items": dict(configs) if configs is not None else None}


def _restore(model: nn.Module, snap: dict) -> None:
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
        if hasattr(model, CONFIG_ATTR):
            delattr(model, CONFIG_ATTR)
    else:  # the same dict object as before, with the same items
        snap["configs"].clear()
        snap["configs"].update(snap["config_items"])
        setattr(model, CONFIG_ATTR, snap["configs"])


def _trial_apply(model: nn.Module, config: LoRAConfig, adapter_name: str, is_trainable: bool,
                 found: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    """Add the adapter's layers (keys and shapes can only be checked against real layers);
    on any failure take them out again, leaving the model exactly as it was. The layers start
    as plain LoRA whatever the file's init: the weights come from the file, and the base is
    never rewritten by a load."""
    snap = _snapshot(model)
    try:
        apply_lora(model, dataclasses.replace(config, init="kaiming"), adapter_name=adapter_name)
        if not is_trainable:  # inference, as PEFT's from_pretrained: everything frozen
            model.requires_grad_(False)
        expected = adapter_tensors(model, adapter_name, config)
        _check(expected, found, directory)
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
    have = sorted(path for path, layer in lora_layers(model) if adapter_name in layer.r)
    want = sorted(resolve_targets(model, config))
    if want != have:
        raise ValueError(f"{directory / CONFIG_NAME}: target_modules select {want}, but adapter {adapter_name!r} "
                         f"of the model is on {have}; load it under another adapter_name")
    current = getattr(model, CONFIG_ATTR)[adapter_name]
    if current.dropout != config.dropout:
        raise ValueError(f"{directory / CONFIG_NAME}: lora_dropout={config.dropout} differs from adapter "
                         f"{adapter_name!r} of the model (dropout={current.dropout}), which a load cannot "
                         f"change; delete_adapter(model, {adapter_name!r}) first, or load under another adapter_name")


def _store_config(model: nn.Module, adapter_name: str, config: LoRAConfig, paths: list[str]) -> None:
    """Record the file's config as the adapter's, so that a later save writes what was loaded."""
    stored = copy.deepcopy(config)
    if isinstance(stored.target_modules, str) and stored.target_modules.lower() == ALL_LINEAR:
        stored.target_modules = sorted(paths)  # as apply_lora records it
    getattr(model, CONFIG_ATTR)[adapter_name] = stored


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
    weights (a load never rewrites the base itself).

    Returns the qualified names of the layers that carry the adapter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_adapter_name(adapter_name)
    check_flag("is_trainable", is_trainable)
    check_flag("rewritten_base", rewritten_base)
    directory = _check_directory(directory)
    config, found = read_adapter(directory)
    if isinstance(config, dict):
        return _load_prompt(model, config, found, directory)
    if isinstance(config, AdapterConfig):
        return _load_bottleneck(model, config, found, directory, adapter_name, is_trainable)
    if adapter_name in (getattr(model, BOTTLENECK_ATTR, None) or {}):
        raise ValueError(f"adapter_name {adapter_name!r} is a bottleneck adapter of this model; "
                         "a LoRA adapter of that name would overwrite its files (use another adapter_name)")
    _check_ranks(config, found, directory)
    _check_base_matches(config, rewritten_base, directory)
    if adapter_name in (getattr(model, CONFIG_ATTR, None) or {}):
        _check_existing(model, adapter_name, config, directory)
        expected = adapter_tensors(model, adapter_name, config)
        _check(expected, found, directory)
    else:
        _check_targets_have_tensors(model, config, found, directory)
        expected = _trial_apply(model, config, adapter_name, is_trainable, found, directory)
    # Every check has passed: from here on nothing fails, so the model changes all at once.
    _copy(expected, found)
    paths = []
    for path, layer in lora_layers(model):
        if adapter_name in layer.r:
            _, alpha = config.rank_and_alpha(path)
            layer.set_scale(adapter_name, alpha, config.rslora)
            paths.append(path)
    _store_config(model, adapter_name, config, paths)
    return paths


def _load_bottleneck(model: nn.Module, config: AdapterConfig, found: dict, directory: Path,
                     adapter_name: str, is_trainable: bool) -> list[str]:
    existing = getattr(model, BOTTLENECK_ATTR, None) or {}
    if existing and adapter_name not in existing:
        raise ValueError(f"model already has bottleneck adapters {sorted(existing)}; one set per model")
    if adapter_name in (getattr(model, CONFIG_ATTR, None) or {}):
        raise ValueError(f"adapter_name {adapter_name!r} is a LoRA adapter of this model; "
                         "a bottleneck adapter of that name would overwrite its files (use another adapter_name)")
    if existing:
        current = existing[adapter_name]
        for field in ("activation", "dropout"):  # built into the modules; a load cannot change them
            if getattr(current, field) != getattr(config, field):
                raise ValueError(f"{directory / CONFIG_NAME}: {field}={getattr(config, field)!r} differs from the "
                                 f"model's bottleneck adapter ({getattr(current, field)!r}); remove_adapters(model) first")
        expected = bottleneck_tensors(model)
        _check(expected, found, directory)
    else:
        grad = {id(p): p.requires_grad for p in model.parameters()}
        try:
            add_adapters(model, config, adapter_name=adapter_name)
            if not is_trainable:
                model.requires_grad_(False)
            expected = bottleneck_tensors(model)
            _check(expected, found, directory)
        except BaseException:
            remove_adapters(model)
            for p in model.parameters():
                p.requires_grad_(grad.get(id(p), p.requires_grad))
            raise
    _copy(expected, found)
    return list(adapter_modules(model))


def _load_prompt(model: nn.Module, config: dict, found: dict, directory: Path) -> list[str]:
    prompt = find_prompt(model)
    if prompt is None:
        raise ValueError(f"{directory} holds a PROMPT_TUNING adapter; load it into a model with a PromptTuning "
                         "(add_prompt_tuning(model, num_virtual_tokens=...))")
    _check({"prompt_embeddings": prompt.prompt_embeddings}, found, directory)
    try:
        check_prompt_config(config, prompt)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{directory / CONFIG_NAME}: " + str(err).removeprefix(f"{CONFIG_NAME}: ")) from None
    _copy({"prompt_embeddings": prompt.prompt_embeddings}, found)
    return ["prompt_embeddings"]
