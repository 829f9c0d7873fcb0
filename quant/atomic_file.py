"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The one recipe, used by adapter files (`lora.files`), the C-loop build cache
(`quant.native`), and the examples' and benchmarks' CSV, JSON and PNG outputs:

1. create a temp file `.<name>.<random>.tmp` in the destination's own folder with
   `O_CREAT | O_EXCL | O_NOFOLLOW` (a new file, never one someone planted, never a link);
2. fill it, then `fsync` it (on disk before the rename, so a power cut cannot leave an
   empty file under the final name);
3. `os.replace` it over the destination (atomic within one file system), then `fsync`
   the folder so that the rename itself is durable.

On any error the temp file is removed and the destination is untouched. The umask is
never changed (it is process-wide: changing it even for a moment would affect files
that other threads create meanwhile).

It lives in `quant/` because `quant` is the bottom layer (quant <- loralab_kernels <- lora) and
`quant.native` needs it; it imports nothing but the standard library.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Callable

_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def temp_name(name: str) -> str:
    """The temp file name for destination file `name` (`.<name>.<16 hex>.tmp`); a killed
    write leaves one behind, which `stale_temps` finds."""
    return f".{name}.{secrets.token_hex(8)}.tmp"


def stale_temps(folder: str | os.PathLike, name: str) -> list[Path]:
    """Temp files that killed writes of `folder/name` left behind."""
    return sorted(Path(folder).glob(f".{name}.*.tmp"))


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Create or replace `path` atomically; `write(tmp)` fills the temp file at path `tmp`.

    For writers that need a path (safetensors' `save_file`, matplotlib's `savefig`). The
    file gets the mode `open()` would give it (0o666 less the umask), also when `write`
    replaces the temp file with its own (safetensors writes an owner-only temp file and
    renames it)."""
    path = Path(path)
    tmp = path.parent / temp_name(path.name)
    fd = os.open(tmp, _FLAGS, 0o666)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 less the umask, as the kernel applied it
    os.close(fd)
    try:
        write(str(tmp))
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, dir_fd: int | None = None,
                       mode: int | None = None) -> None:
    """Create or replace `path` atomically with the bytes `data`.

    Args:
        path: the destination; with `dir_fd`, a plain file name inside that folder.
        data: the whole content.
        dir_fd: an open folder descriptor: every step (create, rename, sync) is relative to
            it, so a folder renamed or replaced by a symlink meanwhile cannot redirect the
            write (`quant.native` writes into a cache folder it has verified this way).
        mode: the file's exact permission bits (set with `fchmod`, whatever the umask);
            None gives 0o666 less the umask, as `open()` does.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if dir_fd is not None and os.path.basename(os.fspath(path)) != os.fspath(path):
        raise ValueError(f"path must be a plain file name when dir_fd is given, got {path!r}")
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, temp_name(name))
    fd = os.open(tmp, _FLAGS, 0o666 if mode is None else mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:  # closes fd
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise
    if dir_fd is not None:
        _fsync_fd(dir_fd)
    else:
        fsync_dir(Path(folder or "."))


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable; some file systems cannot sync a folder, which is
    harmless here (the rename is still atomic)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


def _fsync_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:
        pass
