"""Training with Hugging Face `Trainer`: checkpoints and `save_model` hold the adapters only.

A plain `transformers.Trainer` saves a model it does not know as PEFT's with
`save_pretrained` (or its whole `state_dict`): every base weight and 4-bit buffer, which
`from_pretrained` then loads with missing keys and random weights. `LoRATrainer` (or
`AdapterSavingMixin` in front of any `Trainer` subclass, e.g. TRL's `SFTTrainer`) writes
what `save_adapter` writes instead: `adapter_config.json` + `adapter_model.safetensors` in
PEFT's layout (other adapters in sub-folders, as PEFT does), so a checkpoint folder loads
with `load_adapter` or `peft.PeftModel.from_pretrained`. `resume_from_checkpoint` and
`load_best_model_at_end` read the adapters back into the model being trained.

    from lora import LoRAConfig, apply_lora
    from lora.hf_trainer import LoRATrainer

    apply_lora(model, LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
    trainer = LoRATrainer(model=model, args=TrainingArguments(...), train_dataset=ds)
    trainer.train()
    trainer.save_model("out/adapter")  # adapter_config.json + adapter_model.safetensors

This module imports transformers; `import lora` does not import this module.
"""
from __future__ import annotations

import os

from transformers import Trainer

from .files import adapter_folder, find_prompt, load_adapter, save_adapter
from .files.prompt import PROMPT_NAME
from .model_state import BOTTLENECK_CONFIGS, LORA_CONFIGS, get_state


def _adapter_names(model) -> list[str]:
    """The adapter names `save_adapter` writes for `model` (a prompt is the adapter "default")."""
    names = [*get_state(model, LORA_CONFIGS), *get_state(model, BOTTLENECK_CONFIGS)]
    return names + ([PROMPT_NAME] if find_prompt(model) is not None else [])


class AdapterSavingMixin:
    """Put before a `transformers.Trainer` class: `class MyTrainer(AdapterSavingMixin, SFTTrainer)`.

    Overrides the Trainer's model saving and loading (`_save`, `_load_from_checkpoint`,
    `_load_best_model`); optimizer, scheduler, RNG and trainer state are saved by the
    Trainer as usual (the optimizer holds only the trainable adapter parameters)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not _adapter_names(self._unwrapped()):
            raise ValueError("model has no adapters: call apply_lora (or add_adapters, load_adapter) on it "
                             f"before building {type(self).__name__}, whose checkpoints hold the adapters only")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # Sharded parameters: the live adapter tensors would be shards, and the state dict
            # these engines gather has other keys. Not supported rather than half-saved.
            raise ValueError(f"{type(self).__name__} does not support DeepSpeed or FSDP yet; "
                             "use DDP (torchrun) or a single process")

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapters (as `save_adapter`), and the tokenizer / processor like the Trainer."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:  # non-main ranks write nothing
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(self._unwrapped(), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_adapters(self, model, directory: str) -> None:
        """Every adapter of `model` from its folder under `directory`, into the adapter
        itself (checked as `load_adapter` checks; trainable flags unchanged)."""
        model = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        for name in _adapter_names(model):
            load_adapter(model, adapter_folder(directory, name), adapter_name=name, is_trainable=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_adapters(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapters(self.model, self.state.best_model_checkpoint)


class LoRATrainer(AdapterSavingMixin, Trainer):
    """`transformers.Trainer` whose checkpoints and `save_model` hold the adapters only."""
