"""Byte-level BPE tokenizer rebuilt from a GGUF file's vocabulary and merges.

GGUF stores the GPT-2 style vocabulary (`tokenizer.ggml.tokens`), the merge list
(`tokenizer.ggml.merges`) and a type per token (3 = control/special, e.g. `<|im_end|>`).
The Hugging Face `tokenizers` library rebuilds the exact tokenizer from them.
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


class Tokenizer:
    """Encode/decode text; special tokens like `<|im_start|>` in the text map to their ids."""

    def __init__(self, hf: HFTokenizer, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None, chat_template: str | None = None):
        self.hf, self.bos_id, self.eos_id = hf, bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.chat_template = chat_template  # Jinja source from the model file (chat_format.py)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i


def _strings(reader, key: str) -> list[str]:
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"GGUF file lacks the tokenizer key {key!r}")
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _int(reader, key: str) -> int | None:
    field = reader.fields.get(key)
    return None if field is None else int(field.contents())


def _pre_tokenizer(pre: str):
    """GPT-2 byte-level splitting; SmolLM ("smollm") also splits every digit apart."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "llama3", "qwen2", "deepseek-llm"):
        digits = pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")
        return pre_tokenizers.Sequence([digits, byte_level])
    return byte_level


def tokenizer_from_gguf(reader) -> Tokenizer:
    """Build the `Tokenizer` of a GGUF file opened with `gguf.GGUFReader`."""
    model = reader.fields.get("tokenizer.ggml.model")
    kind = "missing" if model is None else model.contents()
    if kind != "gpt2":
        raise ValueError(f"unsupported tokenizer.ggml.model {kind!r}: only 'gpt2' "
                         "(byte-level BPE) is supported")
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _strings(reader, "tokenizer.ggml.merges")]
    types_field = reader.fields.get("tokenizer.ggml.token_type")
    types = [int(types_field.parts[i][0]) for i in types_field.data] if types_field else []
    hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                fuse_unk=False, byte_fallback=False))
    pre = reader.fields.get("tokenizer.ggml.pre")
    hf.pre_tokenizer = _pre_tokenizer(pre.contents() if pre is not None else "default")
    hf.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == CONTROL]
    hf.add_special_tokens(special)
    template = reader.fields.get("tokenizer.chat_template")
    return Tokenizer(hf, _int(reader, "tokenizer.ggml.bos_token_id"),
                     _int(reader, "tokenizer.ggml.eos_token_id"),
                     _int(reader, "tokenizer.ggml.padding_token_id"),
                     template.contents() if template is not None else None)
