"""`--generate`: answer one prompt with a saved LoRA/QLoRA adapter.

The adapter folder is PEFT's (`adapter_config.json` + `adapter_model.safetensors`).
`finetune.py` adds one small file beside them, `loralab_prompt.json`, which records how
the adapter was trained: the method (QLoRA needs the NF4 base again) and the prompt
(a built-in task wraps the text in its instruction; your own data used the model's chat
template). PEFT ignores the file; an adapter without it (written by PEFT, say) is used
with QLoRA's base and the model's chat template.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from examples.chat_format import chat_format
from examples.methods import load_model, reload_adapter
from examples.report import atomic_write_text
from examples.task import CHATML, Example, prompt

PROMPT_FILE = "loralab_prompt.json"


def write_prompt_file(adapter: Path, method: str, task: str | None) -> Path:
    """Record the method and the built-in task (None: own data, chat template)."""
    path = Path(adapter) / PROMPT_FILE
    atomic_write_text(path, json.dumps({"method": method, "task": task}, indent=2) + "\n")
    return path


def read_prompt_file(adapter: Path, tasks: dict) -> tuple[str, str | None]:
    """(method, task) of an adapter folder; ("qlora", None) when the file is absent."""
    path = Path(adapter) / PROMPT_FILE
    if not path.is_file():
        return "qlora", None
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(info, dict) or set(info) != {"method", "task"}:
        raise ValueError(f"{path} must be an object with the keys 'method' and 'task'")
    if info["method"] not in ("lora", "qlora"):
        raise ValueError(f"{path}: method must be 'lora' or 'qlora', got {info['method']!r}")
    if info["task"] is not None and info["task"] not in tasks:
        raise ValueError(f"{path}: task must be null or one of {', '.join(tasks)}, got {info['task']!r}")
    return info["method"], info["task"]


def answer(text: str, adapter: Path, model_path=None, compute_dtype: torch.dtype = torch.float32,
           tasks: dict[str, Callable[[str], Example]] | None = None,
           max_new_tokens: int = 128) -> str:
    """Greedy answer of the model with `adapter` to `text` (a user message).

    Args:
        tasks: built-in task name -> function wrapping a text into that task's prompt.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text to answer (--generate) must be a non-empty string")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tasks = tasks or {}
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {adapter}")
    method, task = read_prompt_file(adapter, tasks)
    model, tok = load_model(method, model_path, compute_dtype)
    reload_adapter(model, method, adapter, compute_dtype)
    if task is not None:  # the built-in task's instruction and ChatML, as trained
        example, fmt = tasks[task](text), CHATML
    else:
        example, fmt = Example((("user", text),), ""), chat_format(tok)[0]
    ids = tok.encode(prompt(example, (), fmt))
    out = model.generate([ids], max_new_tokens=max_new_tokens, eos_id=tok.eos_id)
    return tok.decode(out[0]).strip()
