"""apply_lora on arbitrary modules: targeting, freezing, merge_and_unload, parameter counts."""
import pytest
import torch
from torch import nn

from lora import (
    LoRAConfig,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    apply_lora,
    delete_adapter,
    merge_and_unload,
    print_trainable_parameters,
    register_lora_layer,
    set_adapter,
    trainable_parameters,
)
from lora.inject import LINEAR_LIKE_TYPES, LORA_LAYER_TYPES, output_head_names


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.mlp(self.norm(x + self.q_proj(x) * torch.sigmoid(self.v_proj(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=16, layers=2, head_name="lm_head", tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head_name = head_name
        setattr(self, head_name, nn.Linear(d, vocab, bias=False))
        if tie:
            getattr(self, head_name).weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return getattr(self, self.head_name)(h)


def randomize_B(model):
    """Make every adapter matter (B starts at zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for b in m.lora_B.values():
                    b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.1)
            if isinstance(m, LoRAEmbedding):
                for a in m.lora_embedding_A.values():
                    a.copy_(torch.randn(a.shape, generator=g) * 0.1)


def make(**kw):
    torch.manual_seed(0)
    return TinyLM(**kw)


def test_targets_by_suffix_and_everything_else_frozen():
    model = make()
    names = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert names == ["blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj", "blocks.1.v_proj"]
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}


def test_targets_by_regex_and_exclude():
    model = make()
    names = apply_lora(model, LoRAConfig(target_modules=r".*\.mlp\.[02]", exclude_modules=["blocks.1.mlp.2"]))
    assert names == ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0"]


def test_no_match_lists_candidates():
    model = make()
    with pytest.raises(ValueError, match="matched no module") as err:
        apply_lora(model, LoRAConfig(target_modules=["k_proj"]))
    assert "blocks.0.q_proj" in str(err.value) and "embed" in str(err.value)
    assert not any(isinstance(m, LoRALayer) for m in model.modules())


def test_unsupported_type_raises():
    with pytest.raises(ValueError, match="LayerNorm"):
        apply_lora(make(), LoRAConfig(target_modules=["norm"]))


@pytest.mark.parametrize("kw,head", [({}, "lm_head"), ({"head_name": "out", "tie": True}, "out"),
                                     ({"head_name": "out"}, "out")])
def test_all_linear_skips_output_head(kw, head):
    model = make(**kw)
    assert output_head_names(model) == {head}
    names = apply_lora(model, LoRAConfig(target_modules="all-linear"))
    assert head not in names and len(names) == 2 * 4
    assert isinstance(getattr(model, head), nn.Linear)


def test_apply_twice_raises_and_second_adapter_switches():
    model = make()
    cfg = LoRAConfig(r=2, target_modules=["q_proj"])
    apply_lora(model, cfg)
    with pytest.raises(ValueError, match="twice"):
        apply_lora(model, cfg)
    apply_lora(model, LoRAConfig(r=3, target_modules=["q_proj"]), adapter_name="task2")
    layer = model.blocks[0].q_proj
    assert layer.adapter_names == ["default", "task2"] and layer.active_adapters == ["default"]
    randomize_B(model)
    ids = torch.randint(0, 50, (2, 5))
    out_default = model(ids)
    weight = layer.base_layer.weight
    set_adapter(model, "task2")
    out_task2 = model(ids)
    assert not torch.allclose(out_default, out_task2)
    assert layer.base_layer.weight is weight
    set_adapter(model, "default")
    torch.testing.assert_close(model(ids), out_default)
    delete_adapter(model, "task2")
    assert layer.adapter_names == ["default"]
    with pytest.raises(ValueError, match="not found"):
        set_adapter(model, "task2")


def test_rank_and_alpha_patterns():
    model = make()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                 rank_pattern={r"blocks\.1\.q_proj": 2}, alpha_pattern={"v_proj": 1}))
    assert model.blocks[0].q_proj.r["default"] == 4 and model.blocks[1].q_proj.r["default"] == 2
    assert model.blocks[1].q_proj.scaling["default"] == 4.0
    assert model.blocks[0].v_proj.scaling["default"] == 0.25


def test_modules_to_save_and_bias_modes():
    model = make()
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], bias="lora_only", modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # the adapter's own copy of lm_head trains (lora/modules_to_save.py); the original stays frozen
    assert "lm_head.modules_to_save.default.weight" in trainable and "blocks.0.q_proj.base_layer.bias" in trainable
    assert "lm_head.original_module.weight" not in trainable
    assert "blocks.0.v_proj.bias" not in trainable
    model = make()
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.v_proj.bias" in trainable and "blocks.1.norm.bias" in trainable
    with pytest.raises(ValueError, match="modules_to_save"):
        apply_lora(make(), LoRAConfig(target_modules=["q_proj"], modules_to_save=["nope"]))


def test_embedding_targeted():
    model = make()
    names = apply_lora(model, LoRAConfig(r=4, target_modules=["embed", "q_proj"]))
    assert isinstance(model.embed, LoRAEmbedding) and "embed" in names


@pytest.mark.parametrize("target", ["all-linear", ["embed", "q_proj", "mlp.2"]])
def test_merge_and_unload_gives_plain_layers_with_equal_outputs(target):
    model = make()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=target))
    randomize_B(model)
    ids = torch.randint(0, 50, (3, 7))
    expected = model(ids)
    merged = merge_and_unload(model)
    assert merged is model
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert type(model.blocks[0].q_proj) is nn.Linear and type(model.embed) is nn.Embedding
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)


def test_register_custom_linear_like_type():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    try:
        register_lora_layer(MyLinear, LoRALinear)
        assert LORA_LAYER_TYPES[MyLinear] is LoRALinear and MyLinear in LINEAR_LIKE_TYPES
        names = apply_lora(model, LoRAConfig(target_modules="all-linear"))
        assert names == ["0", "2"]
    finally:
        LORA_LAYER_TYPES.pop(MyLinear, None)
        LINEAR_LIKE_TYPES.discard(MyLinear)
    with pytest.raises(TypeError, match="wrapper_cls"):
        register_lora_layer(MyLinear, nn.Linear)


def test_bad_inputs():
    with pytest.raises(TypeError, match="model"):
        apply_lora("model", LoRAConfig(target_modules=["q"]))
    with pytest.raises(TypeError, match="config"):
        apply_lora(make(), {"target_modules": ["q"]})
    with pytest.raises(ValueError, match="target_modules"):
        LoRAConfig()


def test_print_trainable_parameters_gpt2_small(capsys):
    """PEFT's README example: GPT-2 small (124M) with r=8 on c_attn. Built on the meta device (no memory)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    apply_lora(model, LoRAConfig(r=8, alpha=32, target_modules=["c_attn"]))
    print_trainable_parameters(model)
    assert capsys.readouterr().out == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364\n"
    assert trainable_parameters(model) == (294_912, 124_734_720)


def test_four_bit_weights_count_once_per_value():
    class Packed4bit(nn.Module):  # the shape of quant.LinearNF4: packed codes in a buffer, a float bias
        def __init__(self, fin, fout):
            super().__init__()
            self.in_features, self.out_features = fin, fout
            self.register_buffer("weight_packed", torch.zeros((fin * fout + 1) // 2, dtype=torch.uint8))
            self.bias = nn.Parameter(torch.zeros(fout), requires_grad=False)

    model = nn.Sequential(Packed4bit(9, 5), nn.Linear(5, 3))
    assert trainable_parameters(model) == (15 + 3, 9 * 5 + 5 + 15 + 3)
