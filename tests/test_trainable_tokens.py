"""Training only some embedding rows (lora/trainable_tokens.py, PEFT's
`trainable_token_indices`): outputs, gradients, tied heads, several adapters, and PEFT's
TrainableTokensLayer on the same rows."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.trainable_tokens import TrainableTokens

ROWS = [1, 5, 7, 18]


def make_embedding(seed=0):
    torch.manual_seed(seed)
    return nn.Embedding(20, 8, padding_idx=0)


def test_fresh_rows_change_nothing_and_new_rows_replace_exactly_those():
    emb = make_embedding()
    w0 = emb.weight.detach().clone()
    layer = TrainableTokens(emb, ROWS)
    x = torch.tensor([[0, 1, 2, 5], [7, 18, 3, 19]])
    assert torch.equal(layer(x), F.embedding(x, w0, padding_idx=0))
    new = torch.randn(len(ROWS), 8)
    with torch.no_grad():
        layer.token_adapter.trainable_tokens_delta["default"].copy_(new)
    expect = w0.clone()
    expect[ROWS] = new
    assert torch.equal(layer(x), F.embedding(x, expect, padding_idx=0))  # a copy of rows: exact
    assert torch.equal(emb.weight, w0)  # the base weight itself is untouched


def test_gradients_reach_only_the_chosen_rows():
    emb = make_embedding()
    layer = TrainableTokens(emb, ROWS)
    x = torch.tensor([[1, 2, 5, 5, 3]])
    g = torch.randn(1, 5, 8)
    (layer(x) * g).sum().backward()
    delta = layer.token_adapter.trainable_tokens_delta["default"]
    expect = torch.zeros_like(delta)
    expect[0] = g[0, 0]  # token 1
    expect[1] = g[0, 2] + g[0, 3]  # token 5, twice
    assert torch.equal(delta.grad, expect)
    assert emb.weight.grad is None and not emb.weight.requires_grad


def test_tied_head_sees_the_same_rows():
    emb = make_embedding()
    head = nn.Linear(8, 20, bias=False)
    head.weight = emb.weight
    tok = TrainableTokens(emb, ROWS)
    out = TrainableTokens(head, tied_to=tok)
    with torch.no_grad():
        tok.token_adapter.trainable_tokens_delta["default"].normal_()
    h = torch.randn(3, 8, dtype=torch.float64)
    expect = h @ tok.rows.weight_with(["default"]).double().T
    torch.testing.assert_close(out(h.float()).double(), expect, rtol=1e-5, atol=1e-5)  # fp32 dot of 8 terms
    tok.disabled = True  # the head follows the embedding
    assert torch.equal(out(h.float()), head(h.float()))
    with pytest.raises(ValueError, match="tied to"):
        out.set_adapter("default")
    other = nn.Linear(8, 20, bias=False)
    with pytest.raises(ValueError, match="tied_to must be"):
        TrainableTokens(other, tied_to=tok)


def test_several_adapters_and_overlap_refused():
    emb = make_embedding()
    layer = TrainableTokens(emb, [1, 2])
    layer.add_adapter("b", [3, 4])
    layer.add_adapter("c", [2, 9])
    layer.set_adapter(["default", "b"])
    assert layer.token_adapter.trainable_tokens_delta["b"].requires_grad
    assert not layer.token_adapter.trainable_tokens_delta["c"].requires_grad
    with pytest.raises(ValueError, match=r"token ids \[2\]"):
        layer.set_adapter(["default", "c"])
    assert layer.active_adapters == ["default", "b"]  # unchanged after the refusal


@pytest.mark.parametrize("indices, exc, pattern", [
    ([], ValueError, "at least one"),
    ([1, 20], ValueError, r"\[0, 20\)"),
    ([1, 1], ValueError, "twice"),
    ("12", TypeError, "list of token ids"),
    ([True], ValueError, "ints"),
])
def test_bad_indices(indices, exc, pattern):
    with pytest.raises(exc, match=pattern):
        TrainableTokens(make_embedding(), indices)


def test_same_outputs_as_peft():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = make_embedding(3)
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(self.emb(x))

    ours, theirs = M(), M()
    theirs.load_state_dict(ours.state_dict())
    ours.emb = TrainableTokens(ours.emb, ROWS)
    theirs = get_peft_model(theirs, LoraConfig(r=2, target_modules=["lin"], trainable_token_indices={"emb": ROWS}))
    new = torch.randn(len(ROWS), 8)
    with torch.no_grad():
        ours.emb.token_adapter.trainable_tokens_delta["default"].copy_(new)
        theirs.base_model.model.emb.token_adapter.trainable_tokens_delta["default"].copy_(new)
        theirs.base_model.model.lin.lora_B["default"].weight.zero_()
    x = torch.tensor([[1, 2, 5, 7, 18, 0]])
    assert torch.equal(ours(x), theirs(x))
    # the state dict key PEFT writes to its file, less the adapter name, is ours less the adapter name
    assert "emb.token_adapter.trainable_tokens_delta.default" in ours.state_dict()
