"""`modules_to_save`, `target_parameters` and `trainable_token_indices` through the library's
API (apply_lora, set_adapter, disable_adapters, delete_adapter, merge_and_unload, unload,
save_adapter / load_adapter), and the same files in Hugging Face PEFT, both directions.

Outputs are compared exactly or to float32 rounding: both libraries compute the same
float32 expressions on the same weights, in the same order where the code paths agree
(torch.equal), and where they differ only in how an update is summed (our functional_call
adds W + delta before the module runs, as PEFT's ParamWrapper does) the tolerance is a
few float32 roundings of sums of <= 16 terms of size ~1: atol = rtol = 1e-5 (~ 100 ulp).
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import (
    LoRAConfig,
    apply_lora,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge_and_unload,
    save_adapter,
    set_adapter,
    unload,
)
from lora.modules_to_save import ModulesToSave
from lora.param_wrapper import LoRAParameter
from lora.trainable_tokens import TrainableTokens

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TOL = dict(rtol=1e-5, atol=1e-5)  # module docstring


# ----- models -----
class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(self.emb(x))))


class Experts(nn.Module):
    """E experts as one (E, a, b) parameter applied to (E, n, a) inputs, then a raw (out, b) projection."""

    def __init__(self, E=3, a=8, b=6, out=5):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, a, b))
        self.proj = nn.Parameter(torch.randn(out, b))

    def forward(self, x):  # (E, n, a) -> (E, n, out)
        return F.linear(torch.bmm(x, self.w), self.proj)


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.experts = Experts()

    def forward(self, x):
        return self.experts(self.inp(x))


def llama():
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                   max_position_embeddings=16, tie_word_embeddings=True,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def seeded(make, seed=0):
    torch.manual_seed(seed)
    return make()


def randomize(model, seed):
    """Random values in every trainable adapter tensor (LoRA B, saved-module copies, token
    rows), in either library, so that each adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_B", "modules_to_save", "trainable_tokens_delta")):
                p.copy_(torch.randn(p.shape, generator=g))


def run(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


TOKENS = torch.tensor([[0, 1, 5, 7, 18, 3, 19]])
EXPERT_X = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(5))


def ours_with_two(make, cfg_a, cfg_b):
    model = seeded(make)
    apply_lora(model, LoRAConfig(**cfg_a), "default")
    apply_lora(model, LoRAConfig(**cfg_b), "b")
    for name in ("default", "b"):  # apply_lora trains the active adapter only: randomize both
        set_adapter(model, name)
        randomize(model, seed=len(name))
    set_adapter(model, "default")
    return model


def peft_model(make, cfg_a, cfg_b):
    base = seeded(make)
    with warnings.catch_warnings():  # PEFT warns that patterns for parameters "were ignored"; they are applied
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(**LoRAConfig(**cfg_a).to_peft_dict()), "default")
        model.add_adapter("b", peft.LoraConfig(**LoRAConfig(**cfg_b).to_peft_dict()))
    for name in ("default", "b"):
        model.set_adapter(name)
        randomize(model, seed=len(name))
    model.set_adapter("default")
    return model.eval()


def peft_outputs(model, x):
    out = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        out[name] = run(model, x)
    with model.disable_adapter():
        out["base"] = run(model, x)
    return out


def our_outputs(model, x):
    out = {}
    for name in ("default", "b"):
        set_adapter(model, name)
        out[name] = run(model, x)
    with disable_adapters(model):
        out["base"] = run(model, x)
    return out


CASES = {
    # two adapters, each with its own copy of the head; "body" LoRA on both
    "modules_to_save": (Classifier, TOKENS, dict(r=2, target_modules=["body"], modules_to_save=["head"]),
                        dict(r=3, alpha=6, target_modules=["body"], modules_to_save=["head"])),
    "tokens_custom": (Classifier, TOKENS, dict(r=2, target_modules=["body"], trainable_token_indices={"emb": [1, 5]}),
                      dict(r=2, target_modules=["body"], trainable_token_indices={"emb": [7, 18, 19]})),
    "tokens_llama_tied": (llama, TOKENS, dict(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 5, 30]),
                          dict(r=2, target_modules=["v_proj"], trainable_token_indices=[2, 7])),
    # a 3-D expert parameter and a 2-D one of the same module: nested wrappers
    # rank / alpha patterns match "<module>.<parameter>" (PEFT's key for a parameter)
    "params": (MoE, EXPERT_X, dict(r=2, alpha=4, target_modules=[], target_parameters=["experts.w", "experts.proj"],
                                   rank_pattern={"proj": 3}, alpha_pattern={"w": 5}),
               dict(r=3, alpha=3, target_modules=["inp"], target_parameters=["experts.proj", "experts.w"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_our_files_load_in_peft_with_the_same_outputs(case, tmp_path):
    make, x, cfg_a, cfg_b = CASES[case]
    ours = ours_with_two(make, cfg_a, cfg_b)
    mine = our_outputs(ours, x)
    assert not torch.equal(mine["default"], mine["b"])
    assert not torch.equal(mine["default"], mine["base"]) and not torch.equal(mine["b"], mine["base"])
    torch.testing.assert_close(mine["base"], run(seeded(make), x), rtol=0, atol=0)  # disabled: the base
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(seeded(make), tmp_path, adapter_name="default")
        theirs.load_adapter(tmp_path / "b", adapter_name="b")
    got = peft_outputs(theirs.eval(), x)
    for name in ("default", "b", "base"):
        torch.testing.assert_close(got[name], mine[name], **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_files_load_here_with_the_same_outputs(case, tmp_path):
    make, x, cfg_a, cfg_b = CASES[case]
    theirs = peft_model(make, cfg_a, cfg_b)
    expect = peft_outputs(theirs, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    ours = seeded(make)
    load_adapter(ours, tmp_path, "default")
    load_adapter(ours, tmp_path / "b", "b")
    got = our_outputs(ours, x)
    for name in ("default", "b", "base"):
        torch.testing.assert_close(got[name], expect[name], **TOL)
    # and PEFT's in-memory state dict, less the adapter name, is what we hold
    sd = peft.get_peft_model_state_dict(theirs, adapter_name="b")
    sd = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    from lora.files import adapter_tensors
    from lora.model_state import lora_configs
    mine = adapter_tensors(ours, "b", lora_configs(ours)["b"])
    assert sorted(mine) == sorted(sd)
    assert all(torch.equal(mine[k], sd[k]) for k in sd)


def test_modules_to_save_copies_route_per_adapter():
    torch.manual_seed(0)
    model = Classifier()
    head = model.head
    apply_lora(model, LoRAConfig(r=2, target_modules=["body"], modules_to_save=["head"]), "a")
    apply_lora(model, LoRAConfig(r=2, target_modules=["body"]), "c")  # does not list the head
    apply_lora(model, LoRAConfig(r=2, target_modules=["body"], modules_to_save=["head"]), "b")
    wrap = model.head
    assert isinstance(wrap, ModulesToSave) and wrap.original_module is head and wrap.adapter_names == ["a", "b"]
    assert wrap.active_adapter == "a"  # a later adapter's copy stays inactive until set_adapter
    assert wrap.modules_to_save["a"].weight.requires_grad and not wrap.modules_to_save["b"].weight.requires_grad
    set_adapter(model, "c")
    assert wrap.current() is head and not head.weight.requires_grad
    set_adapter(model, "b")
    assert wrap.current() is wrap.modules_to_save["b"] and wrap.modules_to_save["b"].weight.requires_grad
    with pytest.raises(ValueError, match="only one of them"):
        set_adapter(model, ["a", "b"])
    assert wrap.active_adapter == "b"  # the refusal changed nothing
    with disable_adapters(model):
        assert wrap.current() is head
    assert wrap.current() is wrap.modules_to_save["b"]
    delete_adapter(model, "b")
    assert wrap.adapter_names == ["a"] and wrap.current() is head
    set_adapter(model, "a")
    copy_a = wrap.modules_to_save["a"]
    merge_and_unload(model)
    assert model.head is copy_a and not any(isinstance(m, ModulesToSave) for m in model.modules())


def test_unload_gives_the_originals_back():
    torch.manual_seed(0)
    model = MoE()
    base = copy.deepcopy(model)
    experts = model.experts
    apply_lora(model, LoRAConfig(r=2, target_modules=["inp"], modules_to_save=[], target_parameters=["w", "proj"]))
    assert isinstance(model.experts, LoRAParameter) and model.experts.parameter_name == "proj"
    assert isinstance(model.experts.base_layer, LoRAParameter) and model.experts.base_layer.base_layer is experts
    randomize(model, 1)
    assert not torch.equal(run(model, EXPERT_X), run(base, EXPERT_X))
    unload(model)
    assert model.experts is experts
    assert torch.equal(run(model, EXPERT_X), run(base, EXPERT_X))


def test_merge_and_unload_writes_parameters_and_token_rows():
    torch.manual_seed(0)
    model = MoE()
    apply_lora(model, LoRAConfig(r=2, target_modules=[], target_parameters=["experts.w", "experts.proj"]))
    randomize(model, 2)
    y = run(model, EXPERT_X)
    merge_and_unload(model)
    assert type(model.experts) is Experts  # both nested wrappers gone
    torch.testing.assert_close(run(model, EXPERT_X), y, **TOL)

    lm = seeded(llama)
    apply_lora(lm, LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 5]))
    assert isinstance(lm.lm_head, TrainableTokens) and lm.lm_head._tied  # the tied head follows the embedding
    randomize(lm, 3)
    y = run(lm, TOKENS)
    merge_and_unload(lm)
    assert type(lm.model.embed_tokens) is nn.Embedding and type(lm.lm_head) is nn.Linear
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    torch.testing.assert_close(run(lm, TOKENS), y, **TOL)


def test_load_checks_shapes_before_changing_anything(tmp_path):
    ours = ours_with_two(MoE, *CASES["params"][2:])
    save_adapter(ours, tmp_path, adapter_names=["default"])
    other = seeded(MoE)
    other.experts.w = nn.Parameter(torch.randn(4, 8, 6))  # 4 experts instead of 3
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="wrong shapes"):
        load_adapter(other, tmp_path)
    assert type(other.experts) is Experts and not hasattr(other, "lora_configs")
    assert other.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())

    tok = ours_with_two(Classifier, *CASES["tokens_custom"][2:])
    save_adapter(tok, tmp_path / "t")
    small = seeded(Classifier)
    small.emb = nn.Embedding(10, 8)  # token 18 is out of range
    with pytest.raises(ValueError, match=r"trainable_token_indices\['emb'\]"):
        load_adapter(small, tmp_path / "t" / "b", "b")
    assert type(small.emb) is nn.Embedding and not hasattr(small, "lora_configs")


@pytest.mark.parametrize("cfg, pattern", [
    (dict(target_modules=[], target_parameters=["nope"]), "matched no parameter"),
    (dict(target_modules=[], target_parameters=["experts.w"], dropout=0.1), "no input to drop out"),
    (dict(target_modules=["inp"], modules_to_save=["experts"], target_parameters=["experts.w"]), "inside a layer"),
    (dict(target_modules=["inp"], target_parameters=["inp.weight"]), "inside a layer"),
    (dict(target_modules=["inp"], trainable_token_indices={"missing": [1]}), "no module named 'missing'"),
    (dict(target_modules=["inp"], trainable_token_indices={"inp": [1]}), "also a LoRA target"),
])
def test_bad_configs_change_nothing(cfg, pattern):
    model = seeded(MoE)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=pattern):
        apply_lora(model, LoRAConfig(**cfg))
    assert str(model) == str(before) and not hasattr(model, "lora_configs")


def test_config_round_trips_through_peft_names():
    cfg = LoRAConfig(r=2, target_modules=None, target_parameters=["experts.w"], trainable_token_indices={"emb": [3]})
    d = cfg.to_peft_dict()
    assert d["target_modules"] == [] and d["target_parameters"] == ["experts.w"]
    assert LoRAConfig.from_peft_dict(d) == LoRAConfig(**{**cfg.to_dict(), "target_modules": []})
    pc = peft.LoraConfig(target_modules=[], target_parameters=["experts.w"], trainable_token_indices=[1, 2])
    back = LoRAConfig.from_peft(pc)
    assert back.target_parameters == ["experts.w"] and back.trainable_token_indices == [1, 2]
    with pytest.raises(ValueError, match="token ids"):
        LoRAConfig(target_modules=["x"], trainable_token_indices=[1, -1])
    with pytest.raises(TypeError, match="apply_lora"):
        apply_lora(seeded(MoE), pc)  # PEFT's own config: a message saying what to write instead


@pytest.mark.parametrize("case", list(CASES))
def test_same_parameter_counts_as_peft(case):
    from lora import trainable_parameters
    make, _, cfg_a, _ = CASES[case]
    ours = seeded(make)
    apply_lora(ours, LoRAConfig(**cfg_a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(seeded(make), peft.LoraConfig(**LoRAConfig(**cfg_a).to_peft_dict()
                                                                   | {"inference_mode": False}))
    assert trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_changes_only_the_active_adapter(case):
    make, x, cfg_a, cfg_b = CASES[case]
    model = ours_with_two(make, cfg_a, cfg_b)
    set_adapter(model, "b")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    (out.logits if hasattr(out, "logits") else out).square().mean().backward()
    torch.optim.SGD(params, lr=0.1).step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    owned = ("lora_A.b.", "lora_B.b.", "modules_to_save.b.", "trainable_tokens_delta.b")
    assert changed and all(any(o in k for o in owned) for k in changed), sorted(changed)
    assert any("lora_" in k for k in changed)  # the LoRA factors train too, not only the extras
    extra = {"modules_to_save": "modules_to_save.b.", "params": "experts.lora_B.b",
             "tokens_custom": "trainable_tokens_delta.b", "tokens_llama_tied": "trainable_tokens_delta.b"}[case]
    assert any(extra in k for k in changed)


def test_merge_two_parameters_of_one_module_one_named_weight():
    """A module's own `weight` next to a second parameter: the outer wrapper's merge target
    is not mistaken for a weight tied to another module."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 7))
            self.gate = nn.Parameter(torch.randn(5, 7))

        def forward(self, x):
            return F.linear(x, self.weight) * torch.sigmoid(F.linear(x, self.gate))

    torch.manual_seed(0)
    model = nn.Sequential(Gated())
    apply_lora(model, LoRAConfig(r=2, target_modules=[], target_parameters=["0.weight", "0.gate"]))
    assert model[0].parameter_name == "gate" and model[0].base_layer.parameter_name == "weight"
    randomize(model, 4)
    x = torch.randn(3, 7)
    y = run(model, x)
    merge_and_unload(model)
    assert type(model[0]) is Gated
    torch.testing.assert_close(run(model, x), y, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["modules_to_save", "tokens_custom", "params"])
def test_half_precision_forward(case, dtype):
    """Base and adapters cast to half precision, against the float32 model (whose own error is
    far below). Unit roundoff u = 2^-8 (bfloat16), 2^-11 (float16); these models chain two dot
    products of <= 8 terms, each erring by ~K u / 4 with random signs, plus the casts of the
    inputs and weights: 8 u, relative to max(1, max |reference|) as `lora.reference.assert_close`."""
    from lora.reference import assert_close
    make, x, cfg_a, cfg_b = CASES[case]
    model = ours_with_two(make, cfg_a, cfg_b)
    set_adapter(model, "b")
    expected = run(model, x)
    out = run(model.to(dtype), x if not x.is_floating_point() else x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.bfloat16:
        assert_close(out, expected, dtype)  # TOL[bfloat16] = 3e-2 ~ 8 u
    else:
        tol = 8 * 2.0 ** -11 * max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(out.double(), expected.double(), atol=tol, rtol=8 * 2.0 ** -11)


def test_delete_adapter_drops_rows_and_gives_layers_back_when_none_are_left():
    model = ours_with_two(llama, *CASES["tokens_llama_tied"][2:])
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, TrainableTokens) and isinstance(head, TrainableTokens) and head._tied
    delete_adapter(model, "b")
    assert emb.adapter_names == ["default"] and model.lm_head is head
    y = run(model, TOKENS)
    set_adapter(model, "default")
    torch.testing.assert_close(run(model, TOKENS), y, rtol=0, atol=0)
    delete_adapter(model, "default")
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(run(model, TOKENS), run(seeded(llama), TOKENS), rtol=0, atol=0)


def test_check_mixed_batch_refuses_rows_that_need_another_copy():
    """`check_mixed_batch` is what `lora.use_adapters` needs to call: the wrappers have no per-row path."""
    from lora.extra_modules import check_mixed_batch
    model = ours_with_two(Classifier, *CASES["modules_to_save"][2:])
    check_mixed_batch(model, ["default", "default"])  # what runs now anyway
    for names in (["default", "b"], ["__base__", "default"]):
        with pytest.raises(ValueError, match="adapter_names: rows with"):
            check_mixed_batch(model, names)
    model = ours_with_two(Classifier, *CASES["tokens_custom"][2:])
    check_mixed_batch(model, ["default"])
    with pytest.raises(ValueError, match="TrainableTokens at emb"):
        check_mixed_batch(model, ["b", "default"])


def test_merge_and_unload_of_named_adapters_keeps_their_copies():
    model = ours_with_two(Classifier, *CASES["modules_to_save"][2:])
    set_adapter(model, "b")
    expect = run(model, TOKENS)
    copy_b = model.head.modules_to_save["b"]
    set_adapter(model, "default")
    with pytest.raises(ValueError, match="only one of them"):
        merge_and_unload(model, adapter_names=["default", "b"])  # two heads for one module
    assert isinstance(model.head, ModulesToSave)  # the refusal changed nothing
    merge_and_unload(model, adapter_names=["b"])
    assert model.head is copy_b
    torch.testing.assert_close(run(model, TOKENS), expect, **TOL)


def test_failed_load_of_a_second_adapter_takes_its_copies_out_again(tmp_path):
    cfg_a, cfg_b = CASES["modules_to_save"][2:]
    model = ours_with_two(Classifier, cfg_a, cfg_b)
    delete_adapter(model, "b")
    wide = seeded(Classifier)
    wide.head = nn.Linear(8, 4)  # a head of another shape: the file's copy does not fit
    apply_lora(wide, LoRAConfig(**cfg_b), "b")
    save_adapter(wide, tmp_path)
    y = run(model, TOKENS)
    with pytest.raises(ValueError, match=r"wrong shapes .*head\.weight"):
        load_adapter(model, tmp_path / "b", "b")
    assert model.head.adapter_names == ["default"] and model.head.active_adapter == "default"
    assert sorted(model.lora_configs) == ["default"] and model.body.adapter_names == ["default"]
    torch.testing.assert_close(run(model, TOKENS), y, rtol=0, atol=0)
