"""Red-team cases for adapter files: names and paths, permissions, concurrency and SIGKILL,
smuggled configs, config types / regexes / JSON, tensor dtypes and finiteness,
validate-before-change, and the alpha round trip.

Every refusal is checked for its exact exception type and a message naming the field;
every refusal during a load also checks that the model is exactly as before.
Concurrency and SIGKILL cases run their savers in forked subprocesses.
"""
import copy
import json
import multiprocessing
import os
import random
import signal
import stat
import threading
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora import (
    AdapterConfig,
    LoRAConfig,
    PromptTuning,
    add_adapters,
    add_prompt_tuning,
    apply_lora,
    combine_adapters,
    load_adapter,
    lora_layers,
    read_adapter,
    save_adapter,
)
from lora.files import (
    CONFIG_NAME,
    META_CONFIG,
    META_REPLACES,
    WEIGHTS_NAME,
    folder_lock,
)

TARGETS = ["emb", "fc1", "fc2"]
IDS = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(3))
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 6)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def adapted(seed: int = 1, name: str = "default", **cfg) -> Net:
    """A Net with one LoRA adapter whose factors are all random (so every one matters)."""
    model = net()
    apply_lora(model, LoRAConfig(**{"r": 2, "alpha": 4, "target_modules": TARGETS, **cfg}), adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in layer.parameters():
                if p.requires_grad or p.dim() == 2 and p.shape != layer.base_layer.weight.shape:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def saved(tmp_path, **cfg):
    folder = tmp_path / "adapter"
    save_adapter(adapted(**cfg), folder)
    return folder


def edit_config(folder, **changes):
    """Change fields of adapter_config.json and drop the weights' embedded config, as a file
    PEFT wrote by hand would be: the edited config is then all there is."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    save_file(load_file(folder / WEIGHTS_NAME), folder / WEIGHTS_NAME)  # no metadata


def edit_weights(folder, key, value):
    tensors = load_file(folder / WEIGHTS_NAME)
    tensors["base_model.model." + key] = value
    save_file(tensors, folder / WEIGHTS_NAME)  # no metadata: the config file stands alone


def state(model) -> tuple:
    """Everything a failed load must leave alone."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()},
            copy.deepcopy(getattr(model, "lora_configs", None)),
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: (dict(layer.r), list(layer.active_adapters), dict(layer.scaling)) for n, layer in lora_layers(model)})


def assert_unchanged(model, before) -> None:
    after = state(model)
    assert after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    assert after[1:] == before[1:]


def assert_load_refused(folder, pattern: str) -> None:
    """load_adapter into a fresh Net raises ValueError matching `pattern` and changes nothing."""
    model = net()
    before = state(model)
    with pytest.raises(ValueError, match=pattern):
        load_adapter(model, folder)
    assert_unchanged(model, before)


# ----- 1. adapter names and paths -----

BAD_NAMES = ["../../x", "a/b", "/tmp/abs", "", ".", "..", "x" * 129, "a b", "a.b"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_save_refuses_unsafe_lora_names(tmp_path, bad):
    model = adapted()
    model.lora_configs[bad] = model.lora_configs["default"]  # as if a name slipped past apply_lora
    out = tmp_path / "deep" / "out"
    with pytest.raises(ValueError, match="adapter_names must be 1-128 characters"):
        save_adapter(model, out)
    assert list(tmp_path.iterdir()) == []  # nothing created, in or out of the directory


def test_save_refuses_unsafe_explicit_and_bottleneck_names(tmp_path):
    with pytest.raises(ValueError, match="adapter_names must be 1-128 characters"):
        save_adapter(adapted(), tmp_path / "out", adapter_names=["../escape"])
    with pytest.raises(TypeError, match="adapter_names must be a str"):
        save_adapter(adapted(), tmp_path / "out", adapter_names=[7])
    model = net()
    add_adapters(model, ["fc1"], bottleneck=4)
    model.bottleneck_configs = {"../../x": model.bottleneck_configs["default"]}
    with pytest.raises(ValueError, match="adapter_names must be 1-128 characters"):
        save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "x").exists()


def test_symlinked_sub_folder_pointing_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "task2").symlink_to(outside, target_is_directory=True)
    model = adapted()
    apply_lora(model, LoRAConfig(r=2, target_modules=["fc1"]), adapter_name="task2")
    with pytest.raises(ValueError, match=r"adapter_names: the folder of 'task2' .* outside directory"):
        save_adapter(model, directory)
    assert list(outside.iterdir()) == []
    assert not (directory / WEIGHTS_NAME).exists()  # refused before the first write, "default" included


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda m, d: load_adapter(m, d, adapter_name="../x"), ValueError, "adapter_name must be 1-128"),
    (lambda m, d: load_adapter(m, d, adapter_name="/abs"), ValueError, "adapter_name must be 1-128"),
    (lambda m, d: load_adapter(m, d, adapter_name=3), TypeError, "adapter_name must be a str"),
    (lambda m, d: add_adapters(m, ["fc1"], bottleneck=4, adapter_name="a/b"), ValueError, "adapter_name must be 1-128"),
])
def test_load_and_add_refuse_unsafe_names(tmp_path, call, exc, pattern):
    folder = saved(tmp_path)
    model = net()
    before = state(model)
    with pytest.raises(exc, match=pattern):
        call(model, folder)
    assert_unchanged(model, before)
    assert not hasattr(model, "bottleneck_configs")


def test_combine_refuses_unsafe_names():
    model = adapted()
    before = state(model)
    with pytest.raises(ValueError, match="name must be 1-128"):
        combine_adapters(model, {"default": 1.0}, name="../mix")
    with pytest.raises(TypeError, match="weights key must be a str"):
        combine_adapters(model, {3: 1.0})
    assert_unchanged(model, before)


# ----- 2. permissions: the umask is never touched -----

def test_atomic_write_never_changes_the_umask(tmp_path, monkeypatch):
    def forbidden(mask):
        raise AssertionError("os.umask called: other threads' files would get the wrong mode")

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", forbidden)
        save_adapter(adapted(), tmp_path)
    finally:
        monkeypatch.undo()
        os.umask(old)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~0o027


def test_files_other_threads_create_during_saves_never_world_writable(tmp_path):
    old = os.umask(0o022)
    stop = threading.Event()
    modes = []

    def create_files():
        i = 0
        while not stop.is_set():
            path = tmp_path / "other" / f"f{i}"
            with open(path, "w"):
                pass
            modes.append(stat.S_IMODE(os.stat(path).st_mode))
            i += 1

    (tmp_path / "other").mkdir()
    thread = threading.Thread(target=create_files)
    thread.start()
    try:
        model = adapted()
        for _ in range(15):
            save_adapter(model, tmp_path / "adapter")
    finally:
        stop.set()
        thread.join()
        os.umask(old)
    assert modes and all(not mode & stat.S_IWOTH for mode in modes), sorted(set(map(oct, modes)))
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE(os.stat(tmp_path / "adapter" / name).st_mode) == 0o644


# ----- 3. concurrency and SIGKILL (subprocesses) -----

def version_model(k: int) -> nn.Module:
    """Adapter version k: every LoRA weight equals k and alpha = k, so weights and config name the version."""
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    apply_lora(model, LoRAConfig(r=2, alpha=k, target_modules=["0", "2"]))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for d in (layer.lora_A, layer.lora_B):
                d["default"].weight.fill_(float(k))
    return model


def saver_loop(directory: str, versions: list[int], seconds: float, started=None) -> None:
    """Child: save the given versions in turn for `seconds` (or until killed)."""
    torch.set_num_threads(1)
    models = [version_model(k) for k in versions]
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        save_adapter(models[i % len(models)], directory)
        if started is not None:
            started.set()
        i += 1
    os._exit(0)


def consistent_version(directory) -> int:
    """Read the folder and load it (two separate reads, each must be of one version k:
    every weight equal to k, alpha = k, scaling = k / r)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "a save was interrupted" is expected after a kill
        config, tensors = read_adapter(directory)
        model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
        load_adapter(model, directory)
    values = {float(v) for t in tensors.values() for v in t.unique()}
    assert values == {float(config.alpha)}, (values, config.alpha)
    loaded = {float(v) for _, layer in lora_layers(model) for d in (layer.lora_A, layer.lora_B)
              for v in d["default"].weight.unique()}
    assert len(loaded) == 1, loaded
    k = loaded.pop()
    assert model.lora_configs["default"].alpha == k
    assert all(layer.scaling["default"] == k / 2 for _, layer in lora_layers(model))
    return int(k)


def _fork(target, *args) -> multiprocessing.Process:
    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    return proc


@needs_fork
def test_two_savers_and_a_reader_always_see_one_adapter(tmp_path):
    directory = tmp_path / "shared"
    save_adapter(version_model(1), directory)
    started = [multiprocessing.get_context("fork").Event() for _ in range(2)]
    savers = [_fork(saver_loop, str(directory), [k], 30.0, started[k - 1]) for k in (1, 2)]
    seen = []
    try:
        assert all(event.wait(20) for event in started)  # both savers are saving
        end = time.monotonic() + 10
        while len(seen) < 50 or (len(set(seen)) < 2 and time.monotonic() < end):
            seen.append(consistent_version(directory))
    finally:
        for proc in savers:
            proc.kill()
            proc.join()
    assert set(seen) == {1, 2}, "the reads did not overlap the saves of both savers"


@needs_fork
def test_sigkill_mid_save_leaves_one_complete_adapter(tmp_path):
    directory = tmp_path / "killed"
    save_adapter(version_model(3), directory)
    rng = random.Random(0)
    for _ in range(10):
        proc = _fork(saver_loop, str(directory), [3, 4], 30.0)
        time.sleep(rng.uniform(0.05, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert consistent_version(directory) in (3, 4)


def hold_lock(directory: str, ready, seconds: float) -> None:
    with folder_lock(directory, exclusive=True):
        ready.set()
        time.sleep(seconds)
    os._exit(0)


@needs_fork
def test_a_read_waits_for_a_save_in_progress(tmp_path):
    directory = saved(tmp_path)
    ready = multiprocessing.get_context("fork").Event()
    proc = _fork(hold_lock, str(directory), ready, 1.0)
    try:
        assert ready.wait(10)
        start = time.monotonic()
        read_adapter(directory)
        assert time.monotonic() - start > 0.5  # blocked on the saver's exclusive lock
    finally:
        proc.join()


# ----- 4. smuggled configs -----

def test_config_smuggled_in_the_weights_metadata_is_an_error(tmp_path):
    folder = saved(tmp_path)
    tensors = load_file(folder / WEIGHTS_NAME)
    evil = json.loads((folder / CONFIG_NAME).read_text()) | {"lora_alpha": 99}
    save_file(tensors, folder / WEIGHTS_NAME, metadata={META_CONFIG: json.dumps(evil), META_REPLACES: "0" * 64})
    assert_load_refused(folder, rf"{CONFIG_NAME} does not match the config .*{WEIGHTS_NAME} .*lora_alpha")


def test_config_of_another_save_beside_the_weights_is_an_error(tmp_path):
    """B's config copied beside A's weights (two unlocked saves interleaved)."""
    a, b = tmp_path / "a", tmp_path / "b"
    save_adapter(adapted(), a)
    save_adapter(adapted(alpha=7), b)
    (a / CONFIG_NAME).write_bytes((b / CONFIG_NAME).read_bytes())
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME} does not match .*\['lora_alpha'\]"):
        read_adapter(a)


def test_interrupted_save_uses_the_embedded_config_only_on_an_exact_hash(tmp_path):
    folder = tmp_path / "a"
    save_adapter(adapted(), folder)
    old = (folder / CONFIG_NAME).read_bytes()
    save_adapter(adapted(alpha=7), folder)
    (folder / CONFIG_NAME).write_bytes(old)  # killed between the two renames
    with pytest.warns(UserWarning, match="interrupted"):
        config, _ = read_adapter(folder)
    assert config.alpha == 7
    (folder / CONFIG_NAME).write_bytes(old + b"\n")  # same JSON, other bytes: no longer the replaced file
    with pytest.raises(ValueError, match="does not match the config"):
        read_adapter(folder)


@pytest.mark.parametrize("metadata,pattern", [
    ({META_CONFIG: '{"r": NaN}'}, r"metadata loralab.adapter_config\) is not valid JSON"),
    ({META_CONFIG: "[1, 2]"}, r"metadata loralab.adapter_config\) must hold a JSON object"),
])
def test_broken_embedded_config_names_the_weights_file(tmp_path, metadata, pattern):
    folder = saved(tmp_path)
    save_file(load_file(folder / WEIGHTS_NAME), folder / WEIGHTS_NAME, metadata=metadata)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} \({pattern}"):
        read_adapter(folder)


def test_interrupted_first_save_reads_as_the_new_adapter(tmp_path):
    """Killed between the two renames of a first save: weights (replacing no config) and no config."""
    folder = saved(tmp_path, alpha=6)
    (folder / CONFIG_NAME).unlink()
    with pytest.warns(UserWarning, match="interrupted"):
        config, _ = read_adapter(folder)
    assert config.alpha == 6
    save_file(load_file(folder / WEIGHTS_NAME), folder / WEIGHTS_NAME)  # PEFT-style: no embedded config
    with pytest.raises(FileNotFoundError, match=f"{CONFIG_NAME} not found"):
        read_adapter(folder)


def test_peft_style_file_without_metadata_uses_the_config_file(tmp_path):
    folder = saved(tmp_path)
    edit_config(folder, lora_alpha=6)
    config, _ = read_adapter(folder)
    assert config.alpha == 6


# ----- 5. config types, regexes, JSON -----

@pytest.mark.parametrize("changes,exc,pattern", [
    ({"use_rslora": "false"}, TypeError, "use_rslora must be a bool"),
    ({"fan_in_fan_out": "no"}, TypeError, "fan_in_fan_out must be a bool"),
    ({"use_dora": 1}, TypeError, "use_dora must be a bool"),
    ({"target_modules": [1, 2]}, TypeError, r"target_modules\[0\] must be a module name"),
    ({"target_modules": "fc(1"}, ValueError, "target_modules: 'fc\\(1' is not a valid regular expression"),
    ({"exclude_modules": "*"}, ValueError, "exclude_modules: .* is not a valid regular expression"),
    ({"modules_to_save": 5}, TypeError, "modules_to_save must be a list"),
    ({"rank_pattern": [1, 2]}, TypeError, "rank_pattern must be a dict"),
    ({"rank_pattern": {"fc(": 2}}, ValueError, r"rank_pattern\['fc\('\]: 'fc\(' is not a valid regular"),
    ({"rank_pattern": {"fc1": 2.5}}, ValueError, r"rank_pattern\['fc1'\]: r must be a positive int"),
    ({"alpha_pattern": {"[": 2.0}}, ValueError, r"alpha_pattern\['\['\]: '\[' is not a valid regular"),
    ({"alpha_pattern": {"fc1": "8"}}, ValueError, r"alpha_pattern\['fc1'\]: alpha must be a finite number"),
    ({"r": "2"}, ValueError, r"\br must be a positive int, got '2'"),
    ({"lora_alpha": "4"}, ValueError, "lora_alpha must be a finite number"),
    ({"lora_dropout": True}, ValueError, "lora_dropout must be a float"),
    ({"bias": ["none"]}, ValueError, "bias must be one of"),
    ({"init_lora_weights": "corda"}, ValueError, "init_lora_weights must be true, false, 'gaussian' or 'eva'"),
    ({"init_lora_weights": 1.5}, TypeError, "init_lora_weights must be a bool"),
    ({"layers_to_transform": "0"}, ValueError, "layers_to_transform must be None, a layer index"),
    ({"lora_bias": "yes"}, TypeError, "lora_bias must be a bool"),
    ({"layer_replication": [[0, 1]]}, ValueError, r"layer_replication=\[\[0, 1\]\] is not supported"),
])
def test_bad_config_fields_name_the_field(tmp_path, changes, exc, pattern):
    folder = saved(tmp_path)
    edit_config(folder, **changes)
    model = adapted(seed=5)
    before = state(model)
    with pytest.raises(exc, match=rf"{CONFIG_NAME}: .*{pattern}"):
        load_adapter(model, folder, adapter_name="other")
    assert_unchanged(model, before)


def test_duplicate_json_keys_are_refused(tmp_path):
    folder = saved(tmp_path)
    text = (folder / CONFIG_NAME).read_text().replace('"lora_alpha": 4,', '"lora_alpha": 4, "lora_alpha": 40,')
    (folder / CONFIG_NAME).write_text(text)
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON: keys \['lora_alpha'\] appear more"):
        read_adapter(folder)


def test_rank_pattern_for_a_module_without_tensors_fails_before_building_it(tmp_path):
    """The file holds nothing for fc2, so no fc2 layer may be built (with r = 10**9 that would
    be 48 GB; the test uses r = 3 so that a regression fails the match instead of the machine)."""
    folder = tmp_path / "a"
    save_adapter(adapted(target_modules=["fc1"]), folder)
    edit_config(folder, target_modules=["fc1", "fc2"], rank_pattern={"fc2": 3})
    assert_load_refused(folder, r"missing keys for \['fc2'\]")


def test_rslora_string_is_not_true():
    """`bool("false")` is True: the old reader turned scaling 2.0 into 2.83."""
    with pytest.raises(TypeError, match="rslora must be a bool"):
        LoRAConfig(r=2, alpha=4, target_modules=["fc1"], rslora="false")
    with pytest.raises(TypeError, match="use_rslora must be a bool"):
        LoRAConfig.from_peft_dict({"r": 2, "lora_alpha": 4, "target_modules": ["fc1"], "use_rslora": "false"})


@pytest.mark.parametrize("text,pattern", [
    (b"[" * 100000 + b"]" * 100000, "nested too deeply|must hold a JSON object"),
    (b'{"r": 2, "x": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than 32 levels"),
    (b'{"r": 2, "lora_alpha": NaN, "target_modules": ["fc1"]}', "non-finite number NaN"),
    (b'{"r": 2, "lora_alpha": -Infinity, "target_modules": ["fc1"]}', "non-finite number -Infinity"),
    (b'{"r": 2, "lora_alpha": 1e999, "target_modules": ["fc1"]}', "does not fit a float"),
    (b'["not", "an", "object"]', "must hold a JSON object, got list"),
    (b'{"r": 2, "target_modules": ["\xff\xfe"]}', "is not valid JSON"),
    (b" " * (1 << 20) + b"{}", "larger than 1048576 bytes"),
])
def test_hostile_config_json_is_a_value_error_naming_the_file(tmp_path, text, pattern):
    folder = saved(tmp_path)
    (folder / CONFIG_NAME).write_bytes(text)
    save_file(load_file(folder / WEIGHTS_NAME), folder / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}.*({pattern})"):
        read_adapter(folder)


@pytest.mark.parametrize("changes,exc,pattern", [
    ({"after": "fc("}, ValueError, "after: 'fc\\(' is not a valid regular expression"),
    ({"after": [1]}, TypeError, "after must be a non-empty list"),
    ({"bottleneck": 0}, ValueError, "bottleneck must be a positive int"),
    ({"activation": ["relu"]}, ValueError, "activation must be one of"),
    ({"dropout": "0.1"}, ValueError, "dropout must be a float"),
])
def test_bad_bottleneck_config_fields(tmp_path, changes, exc, pattern):
    model = net()
    add_adapters(model, ["fc1"], bottleneck=4)
    save_adapter(model, tmp_path)
    edit_config(tmp_path, **changes)
    fresh = net()
    before = state(fresh)
    with pytest.raises(exc, match=rf"{CONFIG_NAME}: {pattern}"):
        load_adapter(fresh, tmp_path)
    assert_unchanged(fresh, before)
    assert not hasattr(fresh, "bottleneck_configs")


@pytest.mark.parametrize("changes,pattern", [
    ({"num_virtual_tokens": "3"}, "num_virtual_tokens must be an int >= 1"),
    ({"num_transformer_submodules": "x"}, "num_transformer_submodules must be an int >= 1"),
    ({"token_dim": 9}, r"token_dim=9 does not match the model's PromptTuning \(8\)"),
])
def test_bad_prompt_config_fields(tmp_path, changes, pattern):
    save_adapter(add_prompt_tuning(net(), 3), tmp_path)
    edit_config(tmp_path, **changes)
    model = add_prompt_tuning(net(), 3)
    before = model.prompt.prompt_embeddings.detach().clone()
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: {pattern}"):
        load_adapter(model, tmp_path)
    assert torch.equal(model.prompt.prompt_embeddings, before)


# ----- 6. tensor dtypes and finite values -----

@pytest.mark.parametrize("value,pattern", [
    (torch.ones(2, 8, dtype=torch.int8), "has dtype torch.int8; adapter weights must be floating point"),
    (torch.ones(2, 8, dtype=torch.bool), "has dtype torch.bool; adapter weights must be floating point"),
    (torch.full((2, 8), float("nan")), "holds NaN or infinite values"),
    (torch.full((2, 8), float("inf"), dtype=torch.float16), "holds NaN or infinite values"),
])
def test_bad_lora_tensors_are_refused_naming_key_and_file(tmp_path, value, pattern):
    folder = saved(tmp_path)
    edit_weights(folder, "fc1.lora_A.weight", value)
    assert_load_refused(folder, rf"{WEIGHTS_NAME}: tensor 'fc1.lora_A.weight' {pattern}")


def test_bad_bottleneck_and_prompt_tensors_are_refused(tmp_path):
    model = net()
    add_adapters(model, ["fc1"], bottleneck=4)
    save_adapter(model, tmp_path / "b")
    edit_weights(tmp_path / "b", "fc1.adapter.up.weight", torch.full((12, 4), float("-inf")))
    with pytest.raises(ValueError, match=r"tensor 'fc1.adapter.up.weight' holds NaN or infinite"):
        load_adapter(net(), tmp_path / "b")
    save_adapter(add_prompt_tuning(net(), 3), tmp_path / "p")
    tensors = {"prompt_embeddings": torch.zeros(3, 8, dtype=torch.int64)}
    save_file(tensors, tmp_path / "p" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"tensor 'prompt_embeddings' has dtype torch.int64"):
        load_adapter(add_prompt_tuning(net(), 3), tmp_path / "p")


def test_int_tensor_for_a_float_modules_to_save_parameter_is_refused(tmp_path):
    folder = tmp_path / "a"
    save_adapter(adapted(modules_to_save=["fc2"]), folder)
    edit_weights(folder, "fc2.bias", torch.ones(6, dtype=torch.int32))
    assert_load_refused(folder, r"wrong dtypes \['fc2.bias: file torch.int32 vs model torch.float32'\]")


# ----- 7. validate before change: a failed load leaves the model exactly as it was -----

FAILURES = {
    "bad_alpha_pattern_regex": lambda f: edit_config(f, alpha_pattern={"fc1)": 3.0}),
    "rank_of_file_differs_from_config": lambda f: edit_config(f, r=3),
    "missing_key": lambda f: save_file({k: v for k, v in load_file(f / WEIGHTS_NAME).items()
                                        if "fc2.lora_B" not in k}, f / WEIGHTS_NAME),
    "nan_tensor": lambda f: edit_weights(f, "emb.lora_embedding_B", torch.full((8, 2), float("nan"))),
    "target_matches_nothing": lambda f: edit_config(f, target_modules=["nope"]),
}


@pytest.mark.parametrize("kind", sorted(FAILURES))
@pytest.mark.parametrize("into", ["fresh", "adapted", "same_name"])
def test_failed_load_changes_nothing(tmp_path, kind, into):
    folder = saved(tmp_path)
    FAILURES[kind](folder)
    model = {"fresh": net, "adapted": lambda: adapted(seed=5, name="other"), "same_name": lambda: adapted(seed=5)}[into]()
    before = state(model)
    with pytest.raises(ValueError):
        load_adapter(model, folder)
    assert_unchanged(model, before)


def test_failed_load_into_a_model_with_a_shared_module_restores_every_name(tmp_path):
    """One Linear registered as both `a` and `b`: a failed load must put it back under both."""
    from test_redteam_numerics import Shared

    source = Shared()
    apply_lora(source, LoRAConfig(r=2, alpha=4, target_modules=["a"]))
    save_adapter(source, tmp_path / "ad")
    # right rank, wrong input width: found only against the real layer, after the trial wrap
    edit_weights(tmp_path / "ad", "a.lora_A.weight", torch.zeros(2, 5))
    model = Shared()
    with pytest.raises(ValueError, match="lora_A"):
        load_adapter(model, tmp_path / "ad")
    assert type(model.a) is nn.Linear and model.b is model.a


def test_a_read_writes_nothing_into_the_folder_it_reads(tmp_path):
    """A PEFT-written folder (no .lock) is read without creating a lock file in it."""
    folder = saved(tmp_path)
    (folder / ".lock").unlink()
    listing = sorted(p.name for p in folder.iterdir())
    load_adapter(net(), folder)
    assert sorted(p.name for p in folder.iterdir()) == listing


def test_add_adapters_failing_on_a_later_module_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    before = state(model)
    with pytest.raises(ValueError, match="cannot infer the output size of ReLU"):
        add_adapters(model, ["0", "1"], bottleneck=2)
    assert_unchanged(model, before)
    assert not hasattr(model, "bottleneck_configs")


@pytest.mark.parametrize("weights,exc,pattern", [
    ({"default": float("nan")}, ValueError, r"weights\['default'\] must be a finite number"),
    ({"default": "1"}, ValueError, r"weights\['default'\] must be a finite number"),
    ({}, ValueError, "weights must be a non-empty dict"),
    ({"default": 1e300}, ValueError, "weights .* the combined update of .* overflows torch.float32"),
])
def test_combine_refusals_change_nothing(weights, exc, pattern):
    model = adapted()
    before = state(model)
    with pytest.raises(exc, match=pattern):
        combine_adapters(model, weights)
    assert_unchanged(model, before)


def test_stale_temp_files_of_killed_saves_are_removed(tmp_path):
    folder = saved(tmp_path)
    stale = folder / f".{WEIGHTS_NAME}.0123456789abcdef.tmp"
    stale.write_bytes(b"half a save")
    foreign = folder / "notes.tmp"
    foreign.write_text("mine")
    save_adapter(adapted(), folder)
    assert not stale.exists() and foreign.read_text() == "mine"


def test_planted_lock_symlink_is_not_followed(tmp_path):
    folder = saved(tmp_path)
    target = tmp_path / "victim"
    target.write_text("keep")
    (folder / ".lock").unlink()
    (folder / ".lock").symlink_to(target)
    with pytest.raises(OSError):
        save_adapter(adapted(), folder)
    assert target.read_text() == "keep"


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"num_virtual_tokens": 0}, ValueError, "num_virtual_tokens must be a positive int"),
    ({"num_virtual_tokens": 2, "init": None}, ValueError, "init must be 'random', 'vocab' or a non-empty 1-D"),
    ({"num_virtual_tokens": 2, "init": ["a", "b"]}, ValueError, "init must be 'random', 'vocab' or a non-empty 1-D"),
    ({"num_virtual_tokens": 2, "generator": 5}, TypeError, "generator must be a torch.Generator"),
])
def test_prompt_tuning_bad_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        PromptTuning(embedding=nn.Embedding(10, 4), **kwargs)


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda pt: pt(torch.zeros(2, 3)), TypeError, "input_ids must be an integer tensor"),
    (lambda pt: pt([[1, 2]]), TypeError, "input_ids must be an integer tensor"),
    (lambda pt: pt(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4)), ValueError,
     r"attention_mask must be a tensor of the shape of input_ids \(2, 3\)"),
    (lambda pt: pt(torch.zeros(2, 3, dtype=torch.long), labels=torch.ones(3, 3)), ValueError,
     r"labels must be a tensor of the shape of input_ids"),
])
def test_prompt_tuning_forward_bad_inputs(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(PromptTuning(2, nn.Embedding(10, 4)))


# ----- 8. alpha (and the whole config) round trip through an existing adapter -----

@pytest.mark.parametrize("cfg", [{"alpha": 7}, {"alpha": 3, "rslora": True}, {"alpha": 5, "alpha_pattern": {"fc1": 11.0}}])
def test_load_into_existing_adapter_then_save_round_trips(tmp_path, cfg):
    source = adapted(seed=2, **cfg)
    expected = source(IDS)
    save_adapter(source, tmp_path / "src")
    target = adapted(seed=9)  # same name and rank, alpha 4, no rsLoRA
    load_adapter(target, tmp_path / "src")
    torch.testing.assert_close(target(IDS), expected, rtol=0, atol=0)
    assert target.lora_configs["default"].alpha == cfg["alpha"]
    save_adapter(target, tmp_path / "again")
    again = net()
    load_adapter(again, tmp_path / "again")
    torch.testing.assert_close(again(IDS), expected, rtol=0, atol=0)
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text()) == \
        json.loads((tmp_path / "src" / CONFIG_NAME).read_text())


def test_load_into_existing_adapter_with_other_dropout_is_refused(tmp_path):
    save_adapter(adapted(dropout=0.1), tmp_path)
    target = adapted(seed=9)
    before = state(target)
    with pytest.raises(ValueError, match=r"lora_dropout=0.1 differs from adapter 'default'"):
        load_adapter(target, tmp_path)
    assert_unchanged(target, before)


def test_lora_name_of_a_bottleneck_adapter_is_refused(tmp_path):
    save_adapter(adapted(), tmp_path / "lora")
    model = net()
    add_adapters(model, AdapterConfig(["fc2"], bottleneck=2), adapter_name="side")
    before = state(model)
    with pytest.raises(ValueError, match="adapter_name 'side' is a bottleneck adapter"):
        load_adapter(model, tmp_path / "lora", adapter_name="side")
    assert_unchanged(model, before)

