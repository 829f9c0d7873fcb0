"""Loading a Hugging Face safetensors Llama folder (examples/hf_loader.py) into the in-repo Llama.

The folders are tiny random checkpoints written by the tests themselves (no hub access)."""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from safetensors.torch import save_file
from test_llama_gguf import byte_chars

from examples import hf_loader
from examples.hf_loader import interleaved_to_half_split, load_hf_llama
from examples.llama import Llama, LlamaConfig

SPECIALS = ["<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)


def write_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json); returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = SPECIALS + byte_chars() + ["Ġt", "Ġth", "he"]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [("Ġ", "t"), ("Ġt", "h"), ("h", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "bos_token": None, "chat_template": TEMPLATE}))
    return len(tokens)


def hf_config(vocab: int, tie: bool, **extra) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
            "hidden_size": SHAPE["dim"], "num_hidden_layers": SHAPE["n_layers"],
            "num_attention_heads": SHAPE["n_heads"], "num_key_value_heads": SHAPE["n_kv_heads"],
            "intermediate_size": SHAPE["ffn_dim"], "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 256, "tie_word_embeddings": tie, "hidden_act": "silu", **extra}


def write_from_in_repo_llama(folder: Path, tie: bool = False, **extra) -> Llama:
    """A random in-repo Llama saved as an HF checkpoint (Q/K rows in HF's half-split layout)."""
    vocab = write_tokenizer(folder)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=vocab, rope_base=10000.0, max_seq_len=256,
                              tie_embeddings=tie, **SHAPE))
    for p in model.parameters():  # norms away from 1 so that a swapped norm would show
        torch.nn.init.normal_(p, std=0.3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if tie:
        del state["lm_head.weight"]
    for k in state:
        if k.endswith("q_proj.weight"):
            state[k] = interleaved_to_half_split(state[k], SHAPE["n_heads"])
        elif k.endswith("k_proj.weight"):
            state[k] = interleaved_to_half_split(state[k], SHAPE["n_kv_heads"])
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(hf_config(vocab, tie, **extra)))
    return model


IDS = torch.tensor([[5, 200, 17, 99, 3, 42, 7, 250], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("tie", [False, True])
def test_hf_folder_gives_the_same_logits_as_the_in_repo_llama(tmp_path, tie):
    ref = write_from_in_repo_llama(tmp_path, tie=tie)
    model, tok = load_hf_llama(tmp_path)
    torch.testing.assert_close(model(IDS), ref(IDS), atol=1e-5, rtol=1e-5)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert tok.eos_id == 1 and tok.encode("<|im_end|>") == [1] and tok.chat_template == TEMPLATE
    assert tok.decode(tok.encode("héllo the world")) == "héllo the world"


def test_the_rope_permutation_matters(tmp_path, monkeypatch):
    """Reading HF's Q/K rows as they are (no permutation) gives other logits: the test above can fail."""
    ref = write_from_in_repo_llama(tmp_path)
    monkeypatch.setattr(hf_loader, "half_split_to_interleaved", lambda w, n: w)
    model, _ = load_hf_llama(tmp_path)
    assert (model(IDS) - ref(IDS)).abs().max() > 1e-2


def test_matches_transformers_llama_on_a_folder_it_saved(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = write_tokenizer(tmp_path)
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(vocab, False).items()
                                      if k not in ("model_type", "architectures")})
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model, _ = load_hf_llama(tmp_path)
    with torch.no_grad():
        want = hf(IDS).logits
    torch.testing.assert_close(model(IDS), want, atol=1e-4, rtol=1e-4)


def test_qlora_loading_and_generation_through_load_model(tmp_path):
    from examples.methods import load_model
    from quant import LinearNF4

    write_from_in_repo_llama(tmp_path)
    model, tok = load_model("qlora", tmp_path)
    assert isinstance(model.model.layers[1].mlp.down_proj, LinearNF4)
    out = model.generate([tok.encode("<|im_start|>user\nhi")], max_new_tokens=3, eos_id=tok.eos_id)
    assert 1 <= len(out[0]) <= 3


@pytest.mark.parametrize("change, words", [
    (dict(model_type="gpt2"), "model_type must be 'llama'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_type='yarn'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(head_dim=32), "head_dim=32"),
])
def test_unsupported_configs_are_refused(tmp_path, change, words):
    write_from_in_repo_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[")):
        load_hf_llama(tmp_path)


def test_missing_files_pickles_and_tensors(tmp_path):
    write_from_in_repo_llama(tmp_path)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        load_hf_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="only safetensors are read"):
        load_hf_llama(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_hf_llama(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_llama(tmp_path / "empty")
