"""Prompt tuning: initialisation, the prepended inputs, training, and PEFT's PROMPT_TUNING files."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora import PromptTunedModel, PromptTuning, add_prompt_tuning, load_adapter, save_adapter

VOCAB, DIM = 40, 8


class TinyLM(nn.Module):
    """A causal LM that accepts input embeddings: mean of the prefix (causal), then a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        mask = torch.ones(x.shape[:2]) if attention_mask is None else attention_mask.to(x.dtype)  # (B, T)
        csum = torch.cumsum(x * mask[..., None], dim=1) / torch.cumsum(mask, dim=1).clamp_min(1)[..., None]
        logits = self.head(torch.tanh(self.proj(csum)))  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        return logits, loss


def _lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


def test_init_modes():
    emb = _lm().embed
    g = torch.Generator().manual_seed(0)
    rnd = PromptTuning(6, emb, "random", generator=g).prompt_embeddings
    assert rnd.shape == (6, DIM) and rnd.abs().max() <= 0.5 and rnd.std() > 0.1
    voc = PromptTuning(5, emb, "vocab", generator=g).prompt_embeddings
    assert all(any(torch.equal(row, e) for e in emb.weight) for row in voc)
    txt = PromptTuning(5, emb, [3, 7]).prompt_embeddings  # repeated, then cut: 3 7 3 7 3
    assert torch.equal(txt, emb.weight[[3, 7, 3, 7, 3]])
    assert torch.equal(PromptTuning(2, emb, [1, 2, 3]).prompt_embeddings, emb.weight[[1, 2]])
    assert not emb.weight.requires_grad


def test_bad_arguments():
    emb = _lm().embed
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
        PromptTuning(0, emb)
    with pytest.raises(ValueError, match="init must be 'random', 'vocab'"):
        PromptTuning(2, emb, "text")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 40\)"):
        PromptTuning(2, emb, [1, 40])
    with pytest.raises(ValueError, match="non-empty 1-D sequence of ints"):
        PromptTuning(2, emb, [0.5])
    with pytest.raises(TypeError, match="embedding must be an nn.Embedding"):
        PromptTuning(2, nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\)"):
        PromptTuning(2, emb)(torch.tensor([1, 2]))


def test_inputs_mask_and_labels_are_extended():
    emb = _lm().embed
    pt = PromptTuning(3, emb, [5])
    ids = torch.tensor([[1, 2, 4, 0], [6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out = pt(ids, attention_mask=mask, labels=ids)
    assert out["inputs_embeds"].shape == (2, 7, DIM)
    assert torch.equal(out["inputs_embeds"][:, :3], emb.weight[5].expand(2, 3, DIM))
    assert torch.equal(out["inputs_embeds"][:, 3:], emb(ids))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1] * 7]))
    assert torch.equal(out["labels"][:, :3], torch.full((2, 3), -100)) and torch.equal(out["labels"][:, 3:], ids)


def test_only_the_prompt_trains_and_the_loss_drops():
    model = _lm()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = add_prompt_tuning(model, 4, init="vocab", generator=torch.Generator().manual_seed(1))
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == ["prompt.prompt_embeddings"]
    ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(ids, 7)  # learnable from a prompt alone: always answer token 7
    opt = torch.optim.Adam([tuned.prompt.prompt_embeddings], lr=0.3)
    losses = []
    for _ in range(20):
        _, loss = tuned(ids, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for n, p in model.named_parameters():
        assert torch.equal(p, frozen[n]), n


def _hf_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_peft_loads_our_prompt_file_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    tuned = add_prompt_tuning(_hf_llama(), 5, init=[3, 9, 11])
    with torch.no_grad():
        tuned.prompt.prompt_embeddings.add_(torch.randn(5, 16, generator=torch.Generator().manual_seed(3)))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ours = tuned(ids, attention_mask=mask).logits
    assert ours.shape == (2, 12, 64)
    save_adapter(tuned, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 5 and cfg["token_dim"] == 16
    assert cfg["num_layers"] == 2 and cfg["num_attention_heads"] == 2
    theirs = peft.PeftModel.from_pretrained(_hf_llama(), str(tmp_path), is_trainable=False)
    torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, ours, atol=1e-5, rtol=1e-5)
    # ... and a prompt PEFT trained and saved loads here
    peft_dir = tmp_path / "peft"
    theirs.save_pretrained(str(peft_dir))
    again = add_prompt_tuning(_hf_llama(), 5)
    load_adapter(again, peft_dir)
    torch.testing.assert_close(again(ids, attention_mask=mask).logits, ours, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="wrong shapes"):
        load_adapter(add_prompt_tuning(_hf_llama(), 4), tmp_path)
    with pytest.raises(ValueError, match="holds a PROMPT_TUNING adapter"):
        load_adapter(_hf_llama(), tmp_path)


def test_text_init_prompt_equals_real_prefix_tokens_in_a_hugging_face_model():
    """Known answer: a prompt initialised from token ids is those tokens' embeddings, so the logits
    equal the model run on the ids with that prefix (position by position)."""
    model = _hf_llama()
    prefix = [5, 17, 2]
    tuned = add_prompt_tuning(model, 3, init=prefix)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = tuned(ids).logits
        want = model(input_ids=torch.cat([torch.tensor(prefix).expand(2, 3), ids], dim=1)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_in_repo_llama_accepts_the_prompt():
    import inspect

    llama = pytest.importorskip("examples.llama")
    if "inputs_embeds" not in inspect.signature(llama.Llama.forward).parameters:
        pytest.skip("examples/llama.py: Llama.forward does not accept inputs_embeds= yet")
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                          ffn_dim=64, max_seq_len=64)).eval()
    prefix = [9, 1, 30, 4]
    tuned = PromptTunedModel(model, PromptTuning(4, model.model.embed_tokens, prefix))
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = tuned(ids)
        want = model(torch.cat([torch.tensor(prefix).expand(2, 4), ids], dim=1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
