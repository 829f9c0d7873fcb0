"""Render chat turns with the model's own chat template (a Jinja template in the model file).

GGUF files carry it as `tokenizer.chat_template`, Hugging Face folders in
`tokenizer_config.json`. It is rendered the way `transformers` renders it: a sandboxed
Jinja environment (no file or attribute access), `trim_blocks` and `lstrip_blocks`,
`raise_exception` for templates that reject a conversation. jinja2 comes with
`transformers`; without it, or for a model without a template, the turns are written
as ChatML (`<|im_start|>role ... <|im_end|>`), the format SmolLM2 was trained on.

Note that SmolLM2's template adds a default system turn ("You are a helpful AI
assistant named SmolLM, ...") when the conversation has none.
"""
from __future__ import annotations

from functools import partial

from examples.task import CHATML, ChatFormat, Turn


def _raise(message: str):
    raise ValueError(f"the chat template rejected the conversation: {message}")


def compile_template(template: str):
    """A compiled Jinja template, or None when jinja2 is not installed."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def render(compiled, specials: dict[str, str], turns: list[Turn],
           add_generation_prompt: bool = True) -> str:
    """The template's text of `turns`; `specials` gives bos_token / eos_token."""
    messages = [{"role": role, "content": content} for role, content in turns]
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           **specials)


def chat_format(tok) -> tuple[ChatFormat, str]:
    """(format, one-line description) for a tokenizer from `tokenizer.py`.

    The answer ends with the tokenizer's eos token, where generation stops."""
    template = getattr(tok, "chat_template", None)
    eos = tok.decode([tok.eos_id], skip_special=False) if tok.eos_id is not None else CHATML.end
    if not template:
        return ChatFormat(CHATML.render, eos), "ChatML (the model file has no chat template)"
    compiled = compile_template(template)
    if compiled is None:
        return ChatFormat(CHATML.render, eos), "ChatML (jinja2 is not installed to render the model's template)"
    bos = tok.decode([tok.bos_id], skip_special=False) if tok.bos_id is not None else ""
    fmt = ChatFormat(partial(render, compiled, {"bos_token": bos, "eos_token": eos}), eos)
    return fmt, "the model's own chat template"
