"""One save_adapter / load_adapter over three formats: a model that carries a prompt and
LoRA adapters at once gets all of them written, and reads them back to the same outputs."""
import pytest
import torch
from test_prompt_tuning import TinyLM

import lora.files
from lora import LoRAConfig, add_prompt_tuning, apply_lora, load_adapter, read_adapter, save_adapter
from lora.files import CONFIG_NAME, FORMATS, WEIGHTS_NAME

IDS = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))


def _prompt_and_lora(seed=0, adapter_name="task"):
    torch.manual_seed(seed)
    tuned = add_prompt_tuning(TinyLM(), 3, init="random", generator=torch.Generator().manual_seed(seed))
    apply_lora(tuned, LoRAConfig(r=2, alpha=4, target_modules=["proj"]), adapter_name=adapter_name)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so it changes the output
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return tuned


def test_prompt_and_lora_are_both_saved_and_reload_to_the_same_outputs(tmp_path):
    tuned = _prompt_and_lora()
    expected, _ = tuned(IDS)
    written = save_adapter(tuned, tmp_path)
    assert sorted(written) == sorted([tmp_path, tmp_path / "task"])
    prompt_cfg, prompt_tensors = read_adapter(tmp_path)
    lora_cfg, lora_tensors = read_adapter(tmp_path / "task")
    assert prompt_cfg["peft_type"] == "PROMPT_TUNING" and list(prompt_tensors) == ["prompt_embeddings"]
    assert isinstance(lora_cfg, LoRAConfig) and sorted(lora_tensors) == [
        "model.proj.lora_A.weight", "model.proj.lora_B.weight"]

    torch.manual_seed(0)  # the same base weights, another prompt, no adapter
    fresh = add_prompt_tuning(TinyLM(), 3, init="random", generator=torch.Generator().manual_seed(5))
    assert not torch.equal(fresh.prompt.prompt_embeddings, tuned.prompt.prompt_embeddings)
    assert load_adapter(fresh, tmp_path) == ["prompt_embeddings"]
    assert load_adapter(fresh, tmp_path / "task", adapter_name="task") == ["model.proj"]
    torch.testing.assert_close(fresh(IDS)[0], expected, rtol=0, atol=0)  # the same tensors: bit-exact


def test_each_adapter_of_a_mixed_model_can_be_saved_alone(tmp_path):
    tuned = _prompt_and_lora()
    assert save_adapter(tuned, tmp_path / "p", adapter_names=["default"]) == [tmp_path / "p"]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [".lock", CONFIG_NAME, WEIGHTS_NAME]
    assert save_adapter(tuned, tmp_path / "l", adapter_names="task") == [tmp_path / "l" / "task"]
    assert not (tmp_path / "l" / CONFIG_NAME).exists()


def test_a_lora_adapter_named_like_the_prompt_is_refused_before_writing(tmp_path):
    tuned = _prompt_and_lora(adapter_name="default")
    with pytest.raises(ValueError, match=r"\['default'\] are used by both LoRA and prompt-tuning adapters"):
        save_adapter(tuned, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_adapters_applied_to_a_submodule_are_not_skipped_silently(tmp_path):
    torch.manual_seed(0)
    inner = TinyLM()
    apply_lora(inner, LoRAConfig(r=2, target_modules=["proj"]), adapter_name="task")
    tuned = add_prompt_tuning(inner, 3)  # the LoRA config lives on `inner`, not on `tuned`
    with pytest.raises(ValueError, match=r"apply_lora was called on submodule\(s\) \['model'\]"):
        save_adapter(tuned, tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert save_adapter(inner, tmp_path) == [tmp_path / "task"]  # the module that holds them saves them


def test_each_format_module_is_registered_under_its_peft_type():
    assert sorted(FORMATS) == ["BOTTLENECK", "LORA", "PROMPT_TUNING"]
    for kind, module in FORMATS.items():
        assert module.PEFT_TYPE == kind and callable(module.parse) and callable(module.load)
    # The names callers import from lora.files keep working after the split.
    for name in ("save_adapter", "load_adapter", "read_adapter", "atomic_write", "folder_lock",
                 "adapter_folder", "adapter_tensors", "bottleneck_tensors", "find_prompt", "parse_json_object",
                 "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX", "META_CONFIG", "META_REPLACES"):
        assert hasattr(lora.files, name), name
