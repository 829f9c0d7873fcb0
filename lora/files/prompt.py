"""Prompt tuning in PEFT's file layout (peft_type PROMPT_TUNING).

One tensor, `prompt_embeddings` (num_virtual_tokens, token_dim), and PEFT's config
(`lora.prompt_tuning.prompt_config`). A model holds at most one `PromptTuning`; its
folder is the adapter "default" (`directory` itself, as PEFT saves its default adapter),
beside the folders of any LoRA or bottleneck adapters the same model carries.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..prompt_tuning import PromptTuning, check_prompt_config, prompt_config
from .checks import check_fit, copy_into
from .folder import CONFIG_NAME

PEFT_TYPE = "PROMPT_TUNING"
PROMPT_NAME = "default"  # the adapter name (and so the folder) of a model's prompt


def find_prompt(model: nn.Module) -> PromptTuning | None:
    """The `PromptTuning` of a model (itself, or its only PromptTuning submodule)."""
    found = [m for m in model.modules() if isinstance(m, PromptTuning)]
    if len(found) > 1:
        raise ValueError(f"model has {len(found)} PromptTuning modules; save or load them one at a time")
    return found[0] if found else None


def load(model: nn.Module, config: dict, found: dict, directory: Path,
         adapter_name: str = PROMPT_NAME, is_trainable: bool = False, rewritten_base: bool = False) -> list[str]:
    """Fill the model's `PromptTuning` with the file's prompt (same size, checked first).
    The prompt is frozen or trainable as the model has it: `is_trainable` does not apply."""
    prompt = find_prompt(model)
    if prompt is None:
        raise ValueError(f"{directory} holds a PROMPT_TUNING adapter; load it into a model with a PromptTuning "
                         "(add_prompt_tuning(model, num_virtual_tokens=...))")
    check_fit({"prompt_embeddings": prompt.prompt_embeddings}, found, directory)
    try:
        check_prompt_config(config, prompt)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{directory / CONFIG_NAME}: " + str(err).removeprefix(f"{CONFIG_NAME}: ")) from None
    copy_into({"prompt_embeddings": prompt.prompt_embeddings}, found)
    return ["prompt_embeddings"]


def parse(config_dict: dict) -> dict:
    return config_dict  # checked against the model's PromptTuning by `load`


def save_plan(model: nn.Module, prompt: PromptTuning) -> tuple[dict[str, torch.Tensor], dict]:
    """(the prompt's tensor by file key, PEFT's PROMPT_TUNING config); PEFT's key has no
    `base_model.model.` prefix here, the prompt not being a module of the base model."""
    return {"prompt_embeddings": prompt.prompt_embeddings}, prompt_config(prompt, getattr(model, "model", model))
