"""Build a `Llama` and its tokenizer from a Hugging Face checkpoint folder.

The folder is what `LlamaForCausalLM.save_pretrained` writes: `config.json`,
`model.safetensors` (or shards listed in `model.safetensors.index.json`) and the
tokenizer's `tokenizer.json` (+ `tokenizer_config.json` for the special tokens and the
chat template). Only safetensors are read: a `pytorch_model.bin` is a pickle, which can
run code when loaded, so it is refused.

RoPE layout: Hugging Face rotates the two *halves* of each head, `(x[i], x[i + hd/2])`,
and its conversion script permuted the Q and K rows of Meta's checkpoints to match.
`llama.apply_rope` rotates *adjacent* pairs `(x[2i], x[2i+1])` as GGUF files do, so Q
and K rows are permuted back here (`half_split_to_interleaved`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from examples.llama import Llama, LlamaConfig

CONFIG, WEIGHTS, INDEX, TOKENIZER, TOKENIZER_CONFIG = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json")
IGNORED_SUFFIX = "rotary_emb.inv_freq"  # a buffer some old checkpoints saved; recomputed here


def is_hf_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return value


def read_config(folder: Path) -> LlamaConfig:
    """`LlamaConfig` of `config.json`; ValueError for what this Llama does not implement."""
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a Hugging Face model folder has config.json)")
    c = _read_json(path)
    if c.get("model_type") != "llama":
        raise ValueError(f"{path}: model_type must be 'llama', got {c.get('model_type')!r}")
    unsupported = {"rope_scaling": None, "attention_bias": False, "mlp_bias": False,
                   "hidden_act": "silu"}
    for key, plain in unsupported.items():
        if c.get(key, plain) != plain:
            raise ValueError(f"{path}: {key}={c[key]!r} is not supported (only {plain!r})")
    rope = c.get("rope_parameters") or {}  # transformers >= 5 writes RoPE settings here
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{path}: rope_type={rope['rope_type']!r} is not supported (only 'default')")
    heads, dim = int(c["num_attention_heads"]), int(c["hidden_size"])
    if c.get("head_dim") not in (None, dim // heads):
        raise ValueError(f"{path}: head_dim={c['head_dim']} != hidden_size / num_attention_heads")
    return LlamaConfig(
        vocab_size=int(c["vocab_size"]), dim=dim, n_layers=int(c["num_hidden_layers"]),
        n_heads=heads, n_kv_heads=int(c.get("num_key_value_heads") or heads),
        ffn_dim=int(c["intermediate_size"]),
        rope_base=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(c.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def half_split_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Q or K weight (n_heads * hd, in) from Hugging Face's RoPE
    layout (per head: first halves, then second halves) to adjacent pairs."""
    out_features, in_features = w.shape
    hd = out_features // n_heads
    # row h*hd + j*hd/2 + i (half j, pair i) -> row h*hd + 2i + j
    return w.view(n_heads, 2, hd // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `half_split_to_interleaved` (to write a checkpoint HF reads)."""
    out_features, in_features = w.shape
    hd = out_features // n_heads
    return w.view(n_heads, hd // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / INDEX).is_file():
        shards = sorted(set(_read_json(folder / INDEX).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{folder / INDEX} has no weight_map")
        return [folder / s for s in shards]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ValueError(f"{folder} has PyTorch pickle weights only; they can run code when "
                         "loaded, so only safetensors are read (convert with save_pretrained)")
    raise FileNotFoundError(f"{folder} has no {WEIGHTS} (nor {INDEX})")


def read_tensors(folder: Path, cfg: LlamaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All weights by `Llama` state-dict key, in `dtype`, Q/K rows in the interleaved layout."""
    from safetensors import safe_open

    state = {}
    for path in _weight_files(folder):
        if not path.is_file():
            raise FileNotFoundError(f"weight shard {path} not found")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if not key.endswith(IGNORED_SUFFIX):
                    state[key] = f.get_tensor(key).to(dtype)
    for key in [k for k in state if k.endswith(("q_proj.weight", "k_proj.weight"))]:
        heads = cfg.n_heads if key.endswith("q_proj.weight") else cfg.n_kv_heads
        state[key] = half_split_to_interleaved(state[key], heads)
    return state


def load_hf_llama(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  max_seq_len: int | None = 2048,
                  linear_factory: Callable[[torch.Tensor], nn.Module] | None = None):
    """Load a Hugging Face Llama folder; arguments and result as `gguf_loader.load_llama`.

    Raises:
        FileNotFoundError: missing files. ValueError: not Llama, unsupported options,
        pickle weights, missing or unexpected tensors.
    """
    folder = Path(folder)
    cfg = read_config(folder)
    if max_seq_len is not None:
        cfg.max_seq_len = min(cfg.max_seq_len, max_seq_len)
    tok = tokenizer_from_folder(folder)
    state = read_tensors(folder, cfg, dtype)
    with torch.device("meta"):
        model = Llama(cfg)
    expected = set(model.state_dict())
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)  # some checkpoints store the tied copy too
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{folder}: tensors missing {missing[:3]} ({len(missing)}), "
                         f"unexpected {unexpected[:3]} ({len(unexpected)})")
    if linear_factory is not None:
        for key in [k for k in state if k.endswith("_proj.weight")]:
            model.set_submodule(key.removesuffix(".weight"), linear_factory(state.pop(key)))
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval(), tok


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(value) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def tokenizer_from_folder(folder: Path):
    """The `tokenizer.Tokenizer` of `tokenizer.json`, with ids of bos/eos/pad and the chat template."""
    from tokenizers import Tokenizer as HFTokenizer

    from examples.tokenizer import Tokenizer

    path = folder / TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the tokenizer of a Hugging Face model folder)")
    hf = HFTokenizer.from_file(str(path))
    tc = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
    mc = _read_json(folder / CONFIG)

    def token_id(name: str) -> int | None:
        text = _token_text(tc.get(name))
        if text is not None and hf.token_to_id(text) is not None:
            return hf.token_to_id(text)
        value = mc.get(f"{name}_id")
        return value[0] if isinstance(value, list) and value else value

    return Tokenizer(hf, token_id("bos_token"), token_id("eos_token"), token_id("pad_token"),
                     _chat_template(tc.get("chat_template")))
