"""`--generate`: answer one prompt with a saved LoRA/QLoRA adapter.

The adapter folder is PEFT's (`adapter_config.json` + `adapter_model.safetensors`).
`finetune.py` adds one small file beside them, `loralab_prompt.json`, which records how
the adapter was trained: the method and, for QLoRA, the bits of its base (an adapter needs
the base it was trained on: NF4, NF3 or NF2), and the prompt (a built-in task wraps the
text in its instruction; your own data used the model's chat template). The adapter's own
config says whether its init (LoftQ, PiSSA, OLoRA) rewrote the base; that init runs again
on the fresh model. PEFT ignores the file; an adapter without it (written by PEFT, say) is
used with QLoRA's NF4 base and the model's chat template.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from examples.chat_format import chat_format
from examples.methods import load_model, lora_config_of, reload_adapter
from examples.report import atomic_write_text
from examples.task import CHATML, Example, prompt

PROMPT_FILE = "loralab_prompt.json"


BASE_BITS = (4, 3, 2)  # NF4, NF3, NF2 (`examples.methods.quant_settings`)


def write_prompt_file(adapter: Path, method: str, task: str | None, bits: int = 4) -> Path:
    """Record the method, the bits of QLoRA's base (None for LoRA) and the built-in task
    (None: own data, chat template)."""
    if method == "qlora" and bits not in BASE_BITS:
        raise ValueError(f"bits must be one of {BASE_BITS} for method 'qlora', got {bits!r}")
    info = {"method": method, "task": task, "bits": bits if method == "qlora" else None}
    path = Path(adapter) / PROMPT_FILE
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")
    return path


def read_prompt_file(adapter: Path, tasks: dict) -> tuple[str, str | None, int | None]:
    """(method, task, bits) of an adapter folder; ("qlora", None, 4) when the file is absent.
    A file without "bits" (written before the key existed) means NF4 for QLoRA."""
    path = Path(adapter) / PROMPT_FILE
    if not path.is_file():
        return "qlora", None, 4
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(info, dict) or set(info) not in ({"method", "task"}, {"method", "task", "bits"}):
        raise ValueError(f"{path} must be an object with the keys 'method', 'task' and 'bits'")
    if info["method"] not in ("lora", "qlora"):
        raise ValueError(f"{path}: method must be 'lora' or 'qlora', got {info['method']!r}")
    if info["task"] is not None and info["task"] not in tasks:
        raise ValueError(f"{path}: task must be null or one of {', '.join(tasks)}, got {info['task']!r}")
    bits = info.get("bits", 4 if info["method"] == "qlora" else None)
    if info["method"] == "qlora" and (type(bits) is not int or bits not in BASE_BITS):
        raise ValueError(f"{path}: bits must be one of {BASE_BITS} for method 'qlora', got {bits!r}")
    if info["method"] == "lora" and bits is not None:
        raise ValueError(f"{path}: bits must be null for method 'lora' (a full-precision base), got {bits!r}")
    return info["method"], info["task"], bits


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
    method, task, bits = read_prompt_file(adapter, tasks)
    config = lora_config_of(adapter, "--generate answers with LoRA adapters only")  # before the model loads
    model, tok = load_model(method, model_path, compute_dtype, bits=bits or 4, init=config.init)
    reload_adapter(model, method, adapter, compute_dtype, bits=bits or 4)
    if task is not None:  # the built-in task's instruction and ChatML, as trained
        example, fmt = tasks[task](text), CHATML
    else:
        example, fmt = Example((("user", text),), ""), chat_format(tok)[0]
    ids = tok.encode(prompt(example, (), fmt))
    out = model.generate([ids], max_new_tokens=max_new_tokens, eos_id=tok.eos_id)
    return tok.decode(out[0]).strip()
