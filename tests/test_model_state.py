"""Everything the library attaches to a user's model is listed in lora/model_state.py."""
import pytest
import torch
from torch import nn

from lora import LoRAConfig, add_adapters, apply_lora, merge_and_unload, remove_adapters, unload
from lora.model_state import MODEL_ATTRIBUTES, drop_state, get_state, set_state


def _plain_attributes(model: nn.Module) -> set[str]:
    """Attributes set on the model object itself (not submodules, parameters or buffers)."""
    return {k for k in vars(model) if k not in ("_modules", "_parameters", "_buffers")}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.mlp = nn.Linear(8, 8)

    def forward(self, x):
        return self.mlp(self.enc(self.attn(x, x, x)[0]))


def test_every_attribute_set_on_the_model_is_listed_and_removed_again():
    torch.manual_seed(0)
    model = Block()
    before = _plain_attributes(model)
    hooks_before = {k: dict(getattr(model, k)) for k in before if k.endswith("hooks") and isinstance(getattr(model, k), dict)}
    apply_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    add_adapters(model, after=["mlp"], bottleneck=2)
    added = _plain_attributes(model) - before
    assert added and added <= set(MODEL_ATTRIBUTES), added
    assert get_state(model, "lora_configs") and get_state(model, "_lora_fast_path_hooks")  # the encoder got one
    remove_adapters(model)
    unload(model)
    assert _plain_attributes(model) == before
    assert {k: dict(getattr(model, k)) for k in hooks_before} == hooks_before
    assert not model.enc._forward_pre_hooks  # the no-op hook that kept PyTorch's fused path off is gone

    model = Block()
    apply_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    merge_and_unload(model)
    assert _plain_attributes(model) == before and not model.enc._forward_pre_hooks


def test_state_functions_check_their_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="attr must be one of"):
        get_state(model, "my_configs")
    with pytest.raises(TypeError, match="value must be a dict"):
        set_state(model, "lora_configs", [1])
    set_state(model, "lora_configs", {"a": 1})
    assert get_state(model, "lora_configs") == {"a": 1}
    drop_state(model, "lora_configs", "bottleneck_configs")
    assert get_state(model, "lora_configs") == {} and not hasattr(model, "lora_configs")
