"""quantize_model on models with tied weights and on the meta device (issue: any nn.Module)."""
import warnings

import pytest
import torch
import torch.nn as nn

from quant import Linear4bit, quantize_model


class TiedLM(nn.Module):
    """An embedding and an output head sharing one weight, as most small LLMs do."""

    def __init__(self, vocab=96, dim=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(self.body(self.embed(idx)))


def test_tied_head_stays_tied_and_in_full_precision_by_default():
    torch.manual_seed(0)
    model = TiedLM()
    with pytest.warns(UserWarning, match=r"\['head'\].*tied to \['embed'\]"):
        quantize_model(model, compute_dtype=torch.float32)
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    assert isinstance(model.body[0], Linear4bit) and isinstance(model.body[2], Linear4bit)
    model(torch.tensor([[1, 2, 3]]))


def test_naming_a_tied_head_is_an_error_and_changes_nothing():
    model = TiedLM()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"target_modules.*\['head'\].*tied.*quantize_tied=True"):
        quantize_model(model, target_modules=["head", "body.0"])
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_quantize_tied_true_quantizes_and_unties():
    torch.manual_seed(0)
    model = TiedLM()
    emb = model.embed.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        quantize_model(model, target_modules=["head"], quantize_tied=True, compute_dtype=torch.float32)
    assert isinstance(model.head, Linear4bit)
    assert torch.equal(model.embed.weight, emb)  # the embedding keeps its full-precision copy
    with pytest.raises(TypeError, match="quantize_tied"):
        quantize_model(TiedLM(), quantize_tied="yes")


def test_untied_models_are_unaffected():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(model)
    assert all(isinstance(m, Linear4bit) for m in model)


def test_meta_model_is_refused_clearly_and_left_unchanged():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"needs real weights.*\['0', '2'\].*meta device.*load the weights first"):
        quantize_model(model)
    assert all(type(model[i]) is nn.Linear for i in (0, 2))
    # once real weights are there, it works
    model.to_empty(device="cpu")
    for m in (model[0], model[2]):
        nn.init.normal_(m.weight)
        nn.init.zeros_(m.bias)
    quantize_model(model)
    assert isinstance(model[0], Linear4bit)
