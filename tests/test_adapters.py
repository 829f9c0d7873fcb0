"""Houlsby bottleneck adapters: the layer against its float64 formula, insertion into models, files."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora import (
    Adapter,
    AdapterConfig,
    add_adapters,
    load_adapter,
    read_adapter,
    remove_adapters,
    save_adapter,
)
from lora.reference import assert_close

ACT_REF = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


def adapter_ref(x, down_w, down_b, up_w, up_b, act):
    """`x + up(act(down(x)))` in float64 (Houlsby sec. 2.1, fig. 2)."""
    x = x.double()
    h = ACT_REF[act](x @ down_w.double().T + down_b.double())  # (..., m)
    return x + h @ up_w.double().T + up_b.double()


def _randomize(adapter: Adapter, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


@pytest.mark.parametrize("act", ["gelu", "relu", "silu", "tanh"])
@pytest.mark.parametrize("shape,m", [((2, 5, 16), 4), ((3, 41), 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_matches_reference_with_grads(act, shape, m, dtype):
    torch.manual_seed(0)
    adapter = Adapter(shape[-1], m, activation=act)
    x = torch.randn(shape).to(dtype)
    torch.testing.assert_close(adapter(x), x, atol=0, rtol=0)  # zero up-projection: exactly the identity
    _randomize(adapter)
    out = adapter(x)
    assert out.dtype == dtype and out.shape == x.shape
    params = [adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias]
    ref_params = [p.detach().double().requires_grad_(True) for p in params]
    ref = adapter_ref(x, *ref_params, act)
    assert_close(out, ref, dtype)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).double()
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    for p, rp in zip(params, ref_params, strict=True):
        assert_close(p.grad, rp.grad, dtype)


def test_adapter_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        Adapter(8, 2, activation="swish")
    with pytest.raises(ValueError, match="bottleneck must be a positive int"):
        Adapter(8, 0)
    with pytest.raises(ValueError, match="dropout must be"):
        Adapter(8, 2, dropout=1.0)
    with pytest.raises(ValueError, match="expected d_model=8"):
        Adapter(8, 2)(torch.randn(3, 9))


class Attn(nn.Module):
    """Returns a tuple, as Hugging Face attention modules do."""

    def __init__(self, d):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, T, d)
        w = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)  # (B, T, T)
        return self.out(w @ v), w


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn, self.mlp = Attn(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(x)[0]
        return x + self.mlp(x)


def _model(seed=0, d=12):
    torch.manual_seed(seed)
    return nn.Sequential(Block(d), Block(d), nn.Linear(d, 5))


def test_add_adapters_inserts_identity_and_freezes_the_rest():
    model = _model()
    x = torch.randn(2, 6, 12)
    before = model(x)
    names = add_adapters(model, after=["attn", "mlp"], bottleneck=4)
    assert names == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.adapter.{k}" for n in names for k in ("down.weight", "down.bias", "up.weight",
                                                                          "up.bias")}
    attn = model.get_submodule("0.attn")
    out0, _ = attn(x)
    attn.adapter.up.bias.data.fill_(1.0)  # the hook adapts the first element of the tuple only
    out1, w = attn(x)
    assert w.shape == (2, 6, 6)
    torch.testing.assert_close(out1, out0 + 1.0)
    remove_adapters(model)
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    assert not any("adapter" in n for n, _ in model.named_parameters())


def test_add_adapters_regex_and_errors():
    model = _model()
    assert add_adapters(model, after=r"\d\.mlp\.2", bottleneck=3) == ["0.mlp.2", "1.mlp.2"]
    with pytest.raises(ValueError, match="already has bottleneck adapters"):
        add_adapters(model, after=["attn"])
    model = _model()
    with pytest.raises(ValueError, match=r"after: 'ffn' matched no module of Sequential"):
        add_adapters(model, after=["attn", "ffn"])
    assert not any("adapter" in n for n, _ in model.named_parameters())  # nothing inserted
    with pytest.raises(TypeError, match="after must be"):
        add_adapters(model, after=[])


def test_adapter_files_round_trip(tmp_path):
    model = _model()
    add_adapters(model, after=["attn", "mlp"], bottleneck=4, activation="silu")
    for i, (_n, m) in enumerate(model.named_modules()):
        if isinstance(m, Adapter):
            _randomize(m, seed=i)
    x = torch.randn(2, 6, 12)
    expected = model(x).detach()
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["bottleneck"] == 4 and cfg["activation"] == "silu"
    config, tensors = read_adapter(tmp_path)
    assert isinstance(config, AdapterConfig)
    assert "0.attn.adapter.down.weight" in tensors and tensors["1.mlp.adapter.up.bias"].shape == (12,)
    fresh = _model()
    assert load_adapter(fresh, tmp_path) == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in fresh.parameters())  # inference, as PEFT's default
    wrong = _model(d=8)
    with pytest.raises(ValueError, match="wrong shapes"):
        load_adapter(wrong, tmp_path)
    assert not any("adapter" in n for n, _ in wrong.named_parameters())  # left as it was


def test_adapters_in_a_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 7))
    before = model(input_ids=ids).logits
    names = add_adapters(model, after=["self_attn", "mlp"], bottleneck=4)
    assert len(names) == 4
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)
    model.model.layers[0].mlp.adapter.up.bias.data.fill_(0.5)
    assert not torch.allclose(model(input_ids=ids).logits, before)
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].mlp.adapter.down.weight.grad is not None
    assert model.model.embed_tokens.weight.grad is None


def test_lora_and_bottleneck_adapters_save_side_by_side(tmp_path):
    from lora import LoRAConfig, apply_lora

    model = _model()
    apply_lora(model, LoRAConfig(r=2, target_modules=["qkv"]), adapter_name="lo")
    add_adapters(model, after=["mlp"], bottleneck=3)
    for i, m in enumerate(model.modules()):
        if isinstance(m, Adapter):
            _randomize(m, seed=i)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    x = torch.randn(1, 4, 12)
    expected = model(x).detach()
    written = save_adapter(model, tmp_path)
    assert sorted(p.name for p in written) == sorted([tmp_path.name, "lo"])
    fresh = _model()
    load_adapter(fresh, tmp_path / "lo", adapter_name="lo")
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), expected, atol=1e-6, rtol=1e-6)
