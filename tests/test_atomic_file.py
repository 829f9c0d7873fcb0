"""The one atomic writer (quant/atomic_file.py): old file or new file, never half of one."""
import os
import stat
import subprocess
import sys

import pytest

from quant.atomic_file import atomic_write, atomic_write_bytes, stale_temps


def test_bytes_replace_the_file_and_leave_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("writer", ["path", "bytes"])
def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path, monkeypatch, writer):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    def failing_fsync(fd):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        if writer == "path":
            atomic_write(path, broken)
        else:
            monkeypatch.setattr(os, "fsync", failing_fsync)  # the temp file is written, then this fails
            atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert stale_temps(tmp_path, "a.bin") == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    with pytest.raises(TypeError, match="data must be bytes"):
        atomic_write_bytes(path, "text")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_modes(tmp_path, umask):
    """Without `mode`: what open() gives under the umask. With `mode`: exactly that mode."""
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "plain", b"x")
        atomic_write(tmp_path / "by_path", lambda tmp: open(tmp, "w").write("x"))
        atomic_write_bytes(tmp_path / "exact", b"x", mode=0o640)
    finally:
        os.umask(old)
    for name in ("plain", "by_path"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "exact").st_mode) == 0o640


def test_dir_fd_writes_into_the_opened_folder_even_after_it_moved(tmp_path):
    """quant.native writes relative to a verified folder descriptor: renaming the folder
    (or planting another under its old name) cannot redirect the write."""
    folder = tmp_path / "cache"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        folder.rename(tmp_path / "moved")
        folder.mkdir()  # a planted folder under the old name
        atomic_write_bytes("lib.so", b"verified", dir_fd=fd, mode=0o700)
    finally:
        os.close(fd)
    assert (tmp_path / "moved" / "lib.so").read_bytes() == b"verified"
    assert list(folder.iterdir()) == []
    with pytest.raises(ValueError, match="plain file name"):
        atomic_write_bytes("sub/lib.so", b"x", dir_fd=0)


def test_quant_can_use_it_without_importing_lora():
    code = "import sys, quant.atomic_file, quant.native; print('lora' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
