"""One adapter folder on disk: where it is, the lock, atomic writes and consistent reads.

Every format (LoRA, bottleneck, prompt tuning) is one folder with `adapter_config.json`
and `adapter_model.safetensors`; this module writes and reads such a folder and knows
nothing of what the tensors mean (see `lora.files` for the crash-safety and concurrency
rules it implements).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from quant.atomic_file import atomic_write, stale_temps

from ..config import check_adapter_name
from .checks import check_values, parse_json_object, strip_keys

try:
    import fcntl
except ImportError:  # not POSIX: saves and reads run without the folder lock
    fcntl = None

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's older pickle format (save_pretrained(safe_serialization=False)); read only
LOCK_NAME = ".lock"  # flock target inside each adapter folder (see lora.files)
PREFIX = "base_model.model."
META_CONFIG = "loralab.adapter_config"  # safetensors metadata: the config text saved with these weights
META_REPLACES = "loralab.replaces_config_sha256"  # ... and the hash of the config.json it replaced
META_BASE = "loralab.base_formats"  # JSON {layer path: its base's 4-bit format tag or "dense"} (LoRA files)
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is a few KiB; more is a broken or hostile file
READ_ATTEMPTS = 3  # re-reads when a writer that does not lock changes the folder under a read


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


def check_directory(directory) -> Path:
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


def write_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict,
                 extra_metadata: dict[str, str] | None = None) -> None:
    """Weights then config, each atomically, under the folder's exclusive lock, with the
    crash-safety metadata (module docstring) and `extra_metadata` (str -> str) beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    with folder_lock(folder, exclusive=True):
        _remove_stale_temps(folder)
        old_config = folder / CONFIG_NAME
        metadata = {**(extra_metadata or {}), "format": "pt", META_CONFIG: config_text,
                    META_REPLACES: _sha256(old_config.read_bytes()) if old_config.is_file() else ""}
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text))


def _remove_stale_temps(folder: Path) -> None:
    """Temp files left by saves that were killed (see `quant.atomic_file`). Called under the
    exclusive lock, when no save of ours can be writing one."""
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        for stale in stale_temps(folder, name):
            stale.unlink(missing_ok=True)


def _read_files(directory: Path, weights_name: str = WEIGHTS_NAME) -> tuple[bytes | None, bytes]:
    """(config bytes, weights bytes) of one consistent moment: read under the shared lock,
    and the config read again afterwards in case a writer that does not lock was busy.
    The config is None when the file is missing (see `_config_of`)."""
    with folder_lock(directory, exclusive=False):
        for _ in range(READ_ATTEMPTS):
            config_bytes = _read_config_bytes(directory / CONFIG_NAME)
            weights_bytes = (directory / weights_name).read_bytes()
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


def _config_of(config_bytes: bytes | None, metadata: dict[str, str], directory: Path, parse: Callable):
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
            config = parse(on_disk, directory / CONFIG_NAME)  # field errors first: they say most
            _check_same_config(on_disk, embedded, directory)
            return config
    warnings.warn(f"{directory / CONFIG_NAME} predates the weights (a save was interrupted); "
                  "using the config saved inside the weights file", stacklevel=4)
    return parse(embedded, directory / WEIGHTS_NAME)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_folder(directory: Path, parse: Callable) -> tuple[object, dict[str, torch.Tensor], dict[str, str]]:
    """(typed config, tensors by file key without PREFIX, the weights file's metadata) of one
    adapter folder, read once under its shared lock; `parse(config_dict, path)` turns the
    chosen config into its type. The tensors are checked to be floating point and finite."""
    weights_name = WEIGHTS_NAME
    if not (directory / WEIGHTS_NAME).is_file() and (directory / BIN_WEIGHTS_NAME).is_file():
        weights_name = BIN_WEIGHTS_NAME  # an older PEFT file; the safetensors one wins where both exist
    if not (directory / weights_name).is_file():  # (a missing config alone may be an interrupted first save)
        missing = CONFIG_NAME if not (directory / CONFIG_NAME).is_file() else WEIGHTS_NAME
        raise FileNotFoundError(f"{directory / missing} not found")
    config_bytes, weights_bytes = _read_files(directory, weights_name)
    if weights_name == BIN_WEIGHTS_NAME:
        metadata, raw = {}, _load_bin(weights_bytes, directory / weights_name)
    else:
        metadata = _safetensors_metadata(weights_bytes, directory / weights_name)
        raw = _load_tensors(weights_bytes, directory / weights_name)
    config = _config_of(config_bytes, metadata, directory, parse)
    tensors = strip_keys(raw, directory / weights_name, PREFIX)
    check_values(tensors, directory / weights_name)
    return config, tensors, metadata


def _load_bin(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch-pickle `adapter_model.bin`, read with `weights_only=True`:
    PyTorch's restricted unpickler builds tensors and plain containers only and refuses any
    other object, so no code from the file runs. It must hold {str: Tensor}."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError (a forbidden object), EOFError / RuntimeError (truncated)
        raise ValueError(f"directory: {path} is not a readable PyTorch weights file (torch.load with "
                         f"weights_only=True refused it: {type(err).__name__}: {err})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise ValueError(f"directory: {path} must hold a dict of tensors by name, got {type(obj).__name__}")
    return obj
