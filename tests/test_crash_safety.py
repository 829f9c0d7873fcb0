"""Saving an adapter is atomic: SIGKILL at random moments never leaves a folder that is
neither the previous complete adapter nor the new one.

A forked child builds its two models, says it is ready, then saves versions k0, k0+1, ... in
a loop and reports each finished save through a pipe; the parent kills it with SIGKILL a
random delay after the ready signal (so the delay is spent saving, however slow the set-up
on a loaded machine), then loads the folder. Version k has rank 2 (k even) or 4 (k odd) and weights that are a function of k,
so a survivor proves exactly which version it is, and a mix of two versions (weights of
one, config of the other) cannot pass.
"""
import os
import random
import select
import signal
import struct
import time
import warnings

import pytest
import torch
from torch import nn

from lora import LoRAConfig, apply_lora, load_adapter, lora_layers, read_adapter, save_adapter

KILLS = 40


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))


def version_model(k: int) -> nn.Module:
    """The model whose adapter is version `k`: rank 2 or 4 by parity, weights determined by k."""
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=2 + 2 * (k % 2), alpha=3 + k % 2, target_modules=["0", "2"]))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for d in (layer.lora_A, layer.lora_B):
                w = d["default"].weight
                w.copy_(float(k) + torch.arange(w.numel(), dtype=w.dtype).reshape(w.shape) / 64)
    return model


def expected_tensors(k: int) -> dict[str, torch.Tensor]:
    return {f"{path}.{name}.weight": getattr(layer, name)["default"].weight.detach()
            for path, layer in lora_layers(version_model(k)) for name in ("lora_A", "lora_B")}


READY = -1  # the child's first message: models built, saving starts now


def saver(directory, k0: int, write_fd: int) -> None:
    """Child: save versions k0, k0+1, ... forever, writing READY first and then each finished k
    to the pipe."""
    torch.set_num_threads(1)
    models = {k0 % 2: version_model(k0), (k0 + 1) % 2: version_model(k0 + 1)}
    os.write(write_fd, struct.pack("<q", READY))
    k = k0
    while True:
        model = models[k % 2]
        if k > k0 + 1:  # change the weights to version k without rebuilding the model
            with torch.no_grad():
                for _, layer in lora_layers(model):
                    for d in (layer.lora_A, layer.lora_B):
                        d["default"].weight.add_(2.0)
        save_adapter(model, directory)
        os.write(write_fd, struct.pack("<q", k))
        k += 1


def survivor_version(directory) -> int:
    """Load the folder both ways; return its version after checking it is exactly that version."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "save was interrupted" warning is expected sometimes
        config, tensors = read_adapter(directory)
        model = tiny_model()
        load_adapter(model, directory)
    k = int(tensors["0.lora_A.weight"][0, 0].item())
    assert config.r == 2 + 2 * (k % 2), f"config of another version than the weights (k={k})"
    expected = expected_tensors(k)
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key
    loaded = {f"{p}.{n}.weight": getattr(layer, n)["default"].weight.detach()
              for p, layer in lora_layers(model) for n in ("lora_A", "lora_B")}
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    return k


def wait_ready(read_fd: int, timeout: float = 120.0) -> None:
    """Block until the child's READY message (8 bytes), at most `timeout` seconds."""
    ready, _, _ = select.select([read_fd], [], [], timeout)
    assert ready, f"the saving child did not start within {timeout} s"
    assert struct.unpack("<q", os.read(read_fd, 8))[0] == READY


def read_finished(read_fd: int) -> list[int]:
    data = b""
    while True:
        try:
            chunk = os.read(read_fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return [struct.unpack("<q", data[i:i + 8])[0] for i in range(0, len(data) - len(data) % 8, 8)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_sigkill_during_saves_leaves_old_or_new_adapter(tmp_path):
    directory = tmp_path / "adapter"
    save_adapter(version_model(0), directory)
    last_done = 0
    rng = random.Random(0)
    mixed_states = finished_saves = 0
    for _ in range(KILLS):
        k0 = last_done + 1
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            try:
                os.close(read_fd)
                saver(directory, k0, write_fd)
            finally:
                os._exit(1)
        os.close(write_fd)
        wait_ready(read_fd)
        time.sleep(rng.uniform(0.0, 0.12))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.set_blocking(read_fd, False)
        finished = read_finished(read_fd)
        os.close(read_fd)
        finished_saves += len(finished)
        done = finished[-1] if finished else last_done
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            read_adapter(directory)
        mixed_states += any("interrupted" in str(w.message) for w in caught)
        k = survivor_version(directory)
        # the last finished save, or the one in flight when the kill came
        assert k in (done, done + 1), (k, done)
        last_done = k
    # leftover temp files (ours end in .tmp; safetensors' own start with .tmp) are the only trace of the kills
    assert sorted(p.name for p in directory.iterdir() if ".tmp" not in p.name) == [
        ".lock", "adapter_config.json", "adapter_model.safetensors"]
    assert finished_saves >= 10, "the children hardly saved: the kills did not hit saves in progress"
    print(f"{KILLS} kills, {finished_saves} saves finished, {mixed_states} kills left new weights "
          "beside the old config; all loaded")


def test_interrupted_save_state_reads_as_new_version(tmp_path):
    """The (new weights, old config) state, built by hand, reads as the new version; a
    config edited by hand afterwards disagrees with the weights: an error naming both files
    (neither silently overridden nor silently paired with weights saved under another config)."""
    directory = tmp_path / "a"
    save_adapter(version_model(0), directory)
    old_config = (directory / "adapter_config.json").read_bytes()
    save_adapter(version_model(1), directory)
    (directory / "adapter_config.json").write_bytes(old_config)  # as if killed between the two renames
    with pytest.warns(UserWarning, match="interrupted"):
        config, _ = read_adapter(directory)
    assert config.r == 4
    assert survivor_version(directory) == 1
    # a deliberate edit (not the replaced config) is taken as is
    edited = old_config.replace(b'"lora_alpha": 3', b'"lora_alpha": 5')
    assert edited != old_config
    (directory / "adapter_config.json").write_bytes(edited)
    with pytest.raises(ValueError, match="adapter_config.json does not match the config .*adapter_model.safetensors"):
        read_adapter(directory)
