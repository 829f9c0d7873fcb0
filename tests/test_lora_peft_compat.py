"""Same adapter file, same outputs: Hugging Face PEFT <-> this library, both directions.

Tiny randomly initialised transformers models (no download): GPT-2 (Conv1D weights,
fan_in_fan_out, tied embeddings) and Llama (nn.Linear, "all-linear").
"""
import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora import LoRAConfig, apply_lora, load_adapter, save_adapter, trainable_parameters  # noqa: E402
from lora.inject import lora_layers  # noqa: E402


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


CASES = {
    "gpt2": (gpt2, dict(r=4, alpha=8, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True,
                        bias="lora_only", modules_to_save=["ln_f"])),
    "llama": (llama, dict(r=4, alpha=16, target_modules="all-linear", rslora=True,
                          rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})),
}
IDS = torch.randint(1, 64, (2, 11), generator=torch.Generator().manual_seed(7))


def peft_config(cfg: dict):
    return peft.LoraConfig(**LoRAConfig(**cfg).to_peft_dict() | {"init_lora_weights": False})


def randomize(model):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for dict_name in layer.adapter_dict_names:
                for p in getattr(layer, dict_name).parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:  # trained biases and modules_to_save
                p.add_(0.1)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("case", CASES)
def test_peft_file_into_this_library(case, tmp_path):
    make, cfg = CASES[case]
    base = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg)).eval()
        peft_model.save_pretrained(tmp_path)
    expected = logits(peft_model)
    assert not torch.allclose(expected, logits(base), atol=1e-3)  # the adapter matters
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_this_library_file_into_peft(case, tmp_path):
    make, cfg = CASES[case]
    base = make()
    ours = copy.deepcopy(base)
    apply_lora(ours, LoRAConfig(**cfg))
    randomize(ours)
    expected = logits(ours)
    assert not torch.allclose(expected, logits(base), atol=1e-3)
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_same_trainable_parameter_counts_as_peft(case):
    make, cfg = CASES[case]
    ours = make()
    apply_lora(ours, LoRAConfig(**cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(make(), peft.LoraConfig(**LoRAConfig(**cfg).to_peft_dict() | {"inference_mode": False}))
    theirs = peft_model.get_nb_trainable_parameters()
    assert trainable_parameters(ours)[0] == theirs[0]
    if not cfg.get("modules_to_save"):  # PEFT also counts its copy of each module to save
        assert trainable_parameters(ours) == theirs
