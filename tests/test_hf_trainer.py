"""lora.hf_trainer: a transformers Trainer whose checkpoints hold the adapter only, in PEFT's layout.

Tolerance for logits of the same weights in PEFT and here: fp32, width <= 48, two layers,
outputs of magnitude ~1, different summation orders: each dot product is off by at most
~K * 2^-24 relative (K = 48), about 3e-6; atol = rtol = 1e-5 bounds it over two layers.
"""
import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from lora import LoRAConfig, apply_lora  # noqa: E402
from lora.hf_trainer import LoRATrainer  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)  # see the module docstring
IDS = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def dataset(n=8, seq=10):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(1, 64, (n, seq), generator=g)]


def trainer_for(model, out, steps=2):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-2,
        save_strategy="steps", save_steps=1, logging_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    return LoRATrainer(model=model, args=args, train_dataset=dataset())


def adapted():
    model = llama()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    return model


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_checkpoints_and_save_model_hold_the_adapter_only_and_load_in_peft(tmp_path):
    model = adapted()
    trainer = trainer_for(model, tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "run" / "checkpoint-1", tmp_path / "run" / "checkpoint-2", tmp_path / "final"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names, folder
        assert not names & {"model.safetensors", "pytorch_model.bin", "config.json"}, folder
        keys = load_file(folder / "adapter_model.safetensors")
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # no base weights
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    trained = logits(model)
    assert not torch.allclose(trained, logits(llama()), atol=1e-3)  # two steps moved the adapter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "final"))
    torch.testing.assert_close(logits(theirs), trained, **TOL)


def test_resume_from_a_checkpoint_reads_the_adapter_back(tmp_path):
    straight = adapted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer_for(straight, tmp_path / "a").train()
        resumed = adapted()  # a fresh adapter: its weights must come from checkpoint-1
        trainer_for(resumed, tmp_path / "a").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    # Step 2 from checkpoint-1's adapter, optimizer and data position is the straight run's step 2
    # (same ops in the same order on the same values): equal to the float.
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        if "lora_" in name:
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_a_model_without_adapters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model has no adapters"):
        trainer_for(llama(), tmp_path)


def test_importing_lora_does_not_import_transformers():
    code = "import sys, lora; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_plain_trainer_would_write_the_whole_model(tmp_path):
    """Why the integration exists: transformers' own Trainer saves base weights too."""
    model = adapted()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True)
    plain = transformers.Trainer(model=copy.deepcopy(model), args=args, train_dataset=dataset())
    plain.save_model(str(tmp_path / "plain"))
    keys = load_file(next((tmp_path / "plain").glob("*.safetensors")))
    assert any("base_layer" in k or "embed_tokens" in k for k in keys)
