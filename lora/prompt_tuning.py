"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

Only `num_virtual_tokens` embedding vectors are learned; they are prepended to the input
embeddings of a frozen model (Lester sec. 2: "soft prompt" P_e of shape (p, e),
concatenated with the embedded input). The attention mask gets `p` ones in front and the
labels `p` entries of -100 (ignored by the loss), as PEFT's PROMPT_TUNING does for
causal language models, so the model itself needs only to accept `inputs_embeds`.

File layout (PEFT's, so `PeftModel.from_pretrained` reads it): `adapter_model.safetensors`
with one tensor `prompt_embeddings` (num_virtual_tokens, token_dim) and an
`adapter_config.json` with `"peft_type": "PROMPT_TUNING"` (see `prompt_config`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

INIT_RANGE = 0.5  # "random uniform" soft prompts are drawn from [-0.5, 0.5] (Lester sec. 3.2 / 7)
IGNORE_INDEX = -100  # label value the cross-entropy loss skips (PyTorch and Hugging Face convention)


class PromptTuning(nn.Module):
    """Learnable virtual-token embeddings for a frozen model.

    Args:
        num_virtual_tokens: p, the number of soft-prompt vectors (Lester sec. 3: 1..150; 20-100 typical).
        embedding: the model's input embedding (`nn.Embedding`, kept frozen, not copied).
        init: "random" (uniform in [-0.5, 0.5]), "vocab" (rows of randomly sampled token
            ids, Lester sec. 2.2 "sampled vocab"), or a sequence of token ids of a text
            (repeated / cut to p, as PEFT's TEXT init; Lester's "class label" idea).
        generator: random source for "random" / "vocab".

    `forward(input_ids, attention_mask=None, labels=None)` returns the keyword arguments
    for the model: `inputs_embeds` (B, p + T, d) and, when given, the extended
    `attention_mask` (B, p + T) and `labels` (B, p + T).
    """

    def __init__(self, num_virtual_tokens: int, embedding: nn.Embedding,
                 init: str | Sequence[int] | torch.Tensor = "random", generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive int, got {num_virtual_tokens!r}")
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.num_virtual_tokens = num_virtual_tokens
        self.token_dim = embedding.embedding_dim
        self.embedding = embedding
        embedding.requires_grad_(False)
        weight = embedding.weight.detach()
        self.init = init if isinstance(init, str) else "text"
        self.prompt_embeddings = nn.Parameter(self._initial(init, weight, generator))  # (p, d)

    def _initial(self, init, weight: torch.Tensor, generator) -> torch.Tensor:
        p, (vocab, d) = self.num_virtual_tokens, weight.shape
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        if isinstance(init, str):
            if init == "random":
                u = torch.rand(p, d, generator=generator, dtype=dtype)
                return ((2 * u - 1) * INIT_RANGE).to(weight.device)
            if init == "vocab":
                ids = torch.randint(0, vocab, (p,), generator=generator)
                return weight[ids.to(weight.device)].to(dtype).clone()
            raise ValueError(f"init must be 'random', 'vocab' or a sequence of token ids, got {init!r}")
        try:
            ids = torch.as_tensor(init)
        except (TypeError, ValueError, RuntimeError, OverflowError):  # e.g. None, strings, ragged lists
            raise ValueError(f"init must be 'random', 'vocab' or a non-empty 1-D sequence of token ids (ints), "
                             f"got {init!r}") from None
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"init: token ids must be a non-empty 1-D sequence of ints, got {init!r}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"init: token ids must lie in [0, {vocab}), got min {int(ids.min())}, max {int(ids.max())}")
        ids = ids.repeat(math.ceil(p / ids.numel()))[:p]  # (p,): repeated, then cut, as PEFT's TEXT init
        return weight[ids.to(weight.device)].to(dtype).clone()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(f"input_ids must be an integer tensor of token ids, got {_describe(input_ids)}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        for name, extra in (("attention_mask", attention_mask), ("labels", labels)):
            if extra is not None and (not isinstance(extra, torch.Tensor) or extra.shape != input_ids.shape):
                raise ValueError(f"{name} must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {_describe(extra)}")
        bsz, p = input_ids.shape[0], self.num_virtual_tokens
        embeds = self.embedding(input_ids)  # (B, T, d)
        prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(bsz, -1, -1)  # (B, p, d)
        out = {"inputs_embeds": torch.cat([prompt, embeds], dim=1)}  # (B, p + T, d)
        if attention_mask is not None:
            ones = attention_mask.new_ones(bsz, p)  # (B, p)
            out["attention_mask"] = torch.cat([ones, attention_mask], dim=1)  # (B, p + T)
        if labels is not None:
            ignore = labels.new_full((bsz, p), IGNORE_INDEX)  # (B, p)
            out["labels"] = torch.cat([ignore, labels], dim=1)  # (B, p + T)
        return out


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def find_input_embedding(model: nn.Module) -> nn.Embedding:
    """`model.get_input_embeddings()` when it exists, else the model's first `nn.Embedding`."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no nn.Embedding to take input embeddings from; pass embedding=")
    return emb


class PromptTunedModel(nn.Module):
    """A frozen model plus a `PromptTuning`: `forward(input_ids, attention_mask=None, labels=None, **kw)`
    calls `model(inputs_embeds=..., attention_mask=..., labels=..., **kw)`.

    Outputs cover the p virtual positions too (as PEFT's), so logits are (B, p + T, vocab).
    """

    def __init__(self, model: nn.Module, prompt: PromptTuning):
        super().__init__()
        self.model = model
        self.prompt = prompt
        model.requires_grad_(False)
        prompt.prompt_embeddings.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        return self.model(**self.prompt(input_ids, attention_mask, labels), **kwargs)


def add_prompt_tuning(model: nn.Module, num_virtual_tokens: int, init: str | Sequence[int] = "random",
                      embedding: nn.Embedding | None = None,
                      generator: torch.Generator | None = None) -> PromptTunedModel:
    """Wrap `model` (which must accept `inputs_embeds=`) with a fresh soft prompt; only the prompt trains."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    prompt = PromptTuning(num_virtual_tokens, embedding or find_input_embedding(model), init, generator)
    return PromptTunedModel(model, prompt)


def prompt_config(prompt: PromptTuning, model: nn.Module | None = None) -> dict:
    """PEFT's `PromptTuningConfig` fields for this prompt (num_layers / num_attention_heads from a
    Hugging Face `model.config` when there is one; PEFT fills them in itself when null)."""
    cfg = getattr(model, "config", None)
    return {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "inference_mode": True, "num_virtual_tokens": prompt.num_virtual_tokens, "token_dim": prompt.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        # Token-id init has no text/tokenizer to record, which PEFT's "TEXT" requires; init does not matter once trained.
        "prompt_tuning_init": "SAMPLE_VOCAB" if prompt.init == "vocab" else "RANDOM",
        "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
        "revision": None, "modules_to_save": None,
    }


def _check_int(config: dict, key: str, required: bool, lowest: int = 1) -> int | None:
    value = config.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"adapter_config.json: {key} must be an int >= {lowest}, got {value!r}")
    return value


def check_prompt_config(config: dict, prompt: PromptTuning) -> None:
    """A PROMPT_TUNING `adapter_config.json` must describe `prompt`: same number of virtual
    tokens and token size, one transformer submodule (decoder-only), typed optional fields."""
    if not isinstance(config, dict) or config.get("peft_type") != "PROMPT_TUNING":
        raise ValueError("adapter_config.json: peft_type must be 'PROMPT_TUNING'")
    submodules = _check_int(config, "num_transformer_submodules", required=False)
    if submodules not in (None, 1):
        raise ValueError(f"adapter_config.json: num_transformer_submodules must be 1 (decoder-only models), "
                         f"got {submodules}")
    for key in ("num_attention_heads", "num_layers"):
        _check_int(config, key, required=False)
    for key in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "task_type"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise TypeError(f"adapter_config.json: {key} must be a string or null, got {type(config[key]).__name__}")
    for key, have in (("num_virtual_tokens", prompt.num_virtual_tokens), ("token_dim", prompt.token_dim)):
        value = _check_int(config, key, required=key == "num_virtual_tokens")  # PEFT may leave token_dim null
        if value is not None and value != have:
            raise ValueError(f"adapter_config.json: {key}={value} does not match the model's PromptTuning ({have})")
