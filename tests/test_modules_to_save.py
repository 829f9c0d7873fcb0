"""One trainable copy per adapter of each `modules_to_save` module (lora/modules_to_save.py),
the original kept for disabled adapters and for adapters that did not list it."""
import pytest
import torch
import torch.nn as nn

from lora.modules_to_save import ModulesToSave


def test_copies_are_per_adapter_and_the_original_stays():
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    w0 = head.weight.detach().clone()
    wrap = ModulesToSave(head, "a")
    wrap.add_adapter("b")
    x = torch.randn(2, 4)
    assert wrap.active_adapter == "a" and wrap.modules_to_save["a"].weight.requires_grad
    assert not wrap.modules_to_save["b"].weight.requires_grad and not head.weight.requires_grad
    wrap(x).sum().backward()  # trains a's copy only
    assert wrap.modules_to_save["a"].weight.grad is not None
    assert wrap.modules_to_save["b"].weight.grad is None and head.weight.grad is None
    with torch.no_grad():
        wrap.modules_to_save["a"].weight.add_(1.0)
    assert torch.equal(head.weight, w0)  # the original is never trained
    ya = wrap(x)
    wrap.set_adapter("b")
    assert torch.equal(wrap(x), head(x))  # b's copy is still the original's values
    assert not torch.equal(ya, head(x))
    wrap.set_adapter("c")  # an adapter that did not list this module: the original
    assert torch.equal(wrap(x), head(x)) and wrap.current() is head
    wrap.set_adapter("a")
    wrap.disabled = True  # disabling gives the base back
    assert torch.equal(wrap(x), head(x))
    wrap.disabled = False
    assert torch.equal(wrap(x), ya)
    assert torch.equal(wrap.weight, wrap.modules_to_save["a"].weight)  # attributes read through
    assert wrap.out_features == 3
    assert wrap.unwrap() is wrap.modules_to_save["a"] and wrap.unwrap("c") is head


def test_errors():
    wrap = ModulesToSave(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already has a copy"):
        wrap.add_adapter("default")
    with pytest.raises(ValueError, match="already wrapped"):
        ModulesToSave(wrap)
    with pytest.raises(ValueError, match="has no copy"):
        wrap.delete_adapter("x")
    with pytest.raises(TypeError, match="original_module must be an nn.Module"):
        ModulesToSave("head")
