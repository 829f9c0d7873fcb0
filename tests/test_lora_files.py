"""save_adapter / load_adapter: PEFT's file layout, atomic writes, strict loading."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora_inject import TinyLM, randomize_B

import lora.files
from lora import LoRAConfig, LoRALayer, apply_lora, load_adapter, save_adapter, set_adapter


def adapted(seed=0, **cfg):
    torch.manual_seed(seed)
    model = TinyLM()
    apply_lora(model, LoRAConfig(**{"r": 4, "alpha": 8, "target_modules": ["q_proj", "embed"], **cfg}))
    randomize_B(model)
    return model


def fresh():
    torch.manual_seed(0)
    return TinyLM()


IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(3))


def test_layout_and_round_trip(tmp_path):
    model = adapted(bias="lora_only", modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)  # a trained head must travel with the adapter
    expected = model(IDS)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.blocks.0.q_proj.lora_A.weight" in keys
    assert "base_model.model.blocks.1.q_proj.lora_B.weight" in keys
    assert "base_model.model.blocks.0.q_proj.base_layer.bias" in keys
    assert {"base_model.model.embed.lora_embedding_A", "base_model.model.lm_head.weight"} <= keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    other = fresh()
    assert not torch.allclose(other(IDS), expected)
    names = load_adapter(other, tmp_path)
    assert names == ["embed", "blocks.0.q_proj", "blocks.1.q_proj"]
    torch.testing.assert_close(other(IDS), expected)
    assert not any(p.requires_grad for p in other.parameters())  # loaded for inference by default


def test_load_is_trainable(tmp_path):
    save_adapter(adapted(), tmp_path)
    model = fresh()
    load_adapter(model, tmp_path, is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_several_adapters_go_to_sub_folders(tmp_path):
    model = adapted()
    apply_lora(model, LoRAConfig(r=2, target_modules=["v_proj"]), adapter_name="task2")
    randomize_B(model)
    save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "task2" / "adapter_model.safetensors").is_file()
    set_adapter(model, "task2")
    expected_task2 = model(IDS)
    other = fresh()
    load_adapter(other, tmp_path)
    load_adapter(other, tmp_path / "task2", adapter_name="task2")
    set_adapter(other, "task2")
    torch.testing.assert_close(other(IDS), expected_task2)


def test_writes_are_atomic(tmp_path, monkeypatch):
    model = adapted()
    save_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lora.files.folder, "save_file", broken_save)  # the module that writes the weights
    with pytest.raises(OSError, match="disk full"):
        save_adapter(adapted(seed=1), tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "adapter_config.json", "adapter_model.safetensors"]


def _edit_file(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("edit,words", [
    (lambda t: t.pop("base_model.model.blocks.1.q_proj.lora_B.weight"), ["missing", "blocks.1.q_proj.lora_B"]),
    (lambda t: t.__setitem__("base_model.model.blocks.0.zzz.lora_A.weight", torch.zeros(4, 16)),
     ["unexpected", "blocks.0.zzz.lora_A"]),
    (lambda t: t.__setitem__("base_model.model.blocks.0.q_proj.lora_A.weight", torch.zeros(3, 16)),
     ["wrong shapes", "blocks.0.q_proj.lora_A.weight", "(3, 16)"]),
])
def test_bad_files_raise_and_leave_the_model_alone(tmp_path, edit, words):
    save_adapter(adapted(), tmp_path)
    _edit_file(tmp_path, edit)
    model = fresh()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as err:
        load_adapter(model, tmp_path)
    for word in words:
        assert word in str(err.value)
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert not hasattr(model, "lora_configs")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_bad_file_into_an_adapted_model_changes_nothing(tmp_path):
    model = adapted()
    save_adapter(model, tmp_path)
    _edit_file(tmp_path, lambda t: t.pop("base_model.model.embed.lora_embedding_B"))
    target = adapted(seed=5)
    before = target(IDS)
    with pytest.raises(ValueError, match="missing"):
        load_adapter(target, tmp_path)
    torch.testing.assert_close(target(IDS), before)


def test_missing_folder_and_nothing_to_save(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_adapter(fresh(), tmp_path / "nope")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(fresh(), tmp_path)


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (owner-only files); the result must be as readable
    as a file written with open() under the same umask."""
    import os
    import stat

    from lora.files import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("x"))
        with open(tmp_path / "b.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode) == 0o644
