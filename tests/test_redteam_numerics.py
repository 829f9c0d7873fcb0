"""Red-team cases for the Hardening issue (items 4, 6, 7, 8): adapter names, training flags
of new modules, 4-bit merge cycles, shared and tied modules, the memory estimator and its
command line, and errors that must name the argument at fault.

Every case asserts the exact exception type and a message naming the argument, or an
exact result (bit-equality where the arithmetic is the same, stated tolerances otherwise).
"""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

from lora import (
    LoRAConfig,
    LoRAEmbedding,
    LoRALinear,
    QLoRALinear,
    apply_lora,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge_and_unload,
    save_adapter,
    set_adapter,
)
from lora.analysis import (
    adapter_matrices,
    effective_rank,
    energy_captured,
    subspace_similarity,
    truncate,
)
from lora.inject import lora_layers
from lora.memory import ModelSpec, estimate, main, nf4_storage_bytes
from quant import LinearNF4

BAD_NAMES = ["", "a.b", "../evil", "a/b", "x" * 129, "naïve"]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def lora_mlp(**cfg):
    model = mlp()
    apply_lora(model, LoRAConfig(**({"r": 2, "target_modules": ["0", "2"]} | cfg)))
    return model


def randomize_b(model, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.r:  # the zero-initialised factor: B, or A for embeddings
                zero = layer.lora_B[name].weight if hasattr(layer, "lora_B") else layer.lora_embedding_A[name]
                zero.copy_(torch.randn(zero.shape, generator=g) * std)


# ----- 1. adapter names: one safe path component, checked before anything changes -----

@pytest.mark.parametrize("bad", BAD_NAMES)
def test_apply_lora_refuses_unsafe_names_and_leaves_model_untouched(bad):
    model = mlp()
    with pytest.raises(ValueError, match=r"adapter_name must be 1-128 characters"):
        apply_lora(model, LoRAConfig(r=2, target_modules=["0"]), adapter_name=bad)
    assert type(model[0]) is nn.Linear and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("call", [
    lambda: LoRALinear(4, 4, adapter_name="a.b"),
    lambda: LoRAEmbedding(5, 4, adapter_name="a/b"),
    lambda: LoRALinear(4, 4).add_adapter("../x"),
    lambda: LoRALinear(4, 4).delete_adapter("a.b"),
    lambda: LoRALinear(4, 4).set_adapter(["default", "a/b"]),
    lambda: LoRALinear(4, 4).merge(adapter_names=["a.b"]),
    lambda: QLoRALinear.from_layer(LinearNF4(64, 8, compute_dtype=torch.float32), adapter_name="a.b"),
    lambda: delete_adapter(lora_mlp(), "a/b"),
    lambda: set_adapter(lora_mlp(), ["a.b"]),
    lambda: adapter_matrices(lora_mlp(), adapter_name="../x"),
], ids=["LoRALinear", "LoRAEmbedding", "add_adapter", "layer_delete", "layer_set_adapter", "layer_merge",
        "QLoRALinear", "model_delete", "model_set_adapter", "adapter_matrices"])
def test_every_function_taking_a_name_checks_it(call):
    with pytest.raises(ValueError, match=r"adapter_names? must be 1-128 characters from \[A-Za-z0-9_-\]"):
        call()


def test_from_layer_with_bad_name_leaves_the_base_trainable():
    base = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"adapter_name must be 1-128"):
        LoRALinear.from_layer(base, adapter_name="a.b")
    assert base.weight.requires_grad  # validated before the base was frozen


def test_name_of_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"adapter_name must be a str, got int"):
        apply_lora(mlp(), LoRAConfig(r=2, target_modules=["0"]), adapter_name=3)


# ----- 2. new modules follow the training flag of what they wrap -----

@pytest.mark.parametrize("training", [False, True])
def test_apply_lora_gives_layers_the_models_mode(training):
    model = mlp().train(training)
    apply_lora(model, LoRAConfig(r=2, dropout=0.1, dora=True, target_modules=["0", "2"]))
    modes = {name: m.training for name, m in model.named_modules()}
    assert set(modes.values()) == {training}, modes


def test_add_adapter_follows_the_layers_mode():
    layer = LoRALinear(4, 4, dropout=0.1).eval()
    layer.add_adapter("second", dropout=0.5, dora=True)
    assert not layer.lora_dropout["second"].training
    assert not layer.lora_A["second"].training and not layer.lora_magnitude_vector["second"].training


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_loaded_dropout_adapter_is_deterministic_and_equals_peft(tmp_path):
    peft = pytest.importorskip("peft")
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    trained = tiny_llama().train()
    apply_lora(trained, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    randomize_b(trained)
    save_adapter(trained, tmp_path)

    ours = tiny_llama()  # eval mode, like a model loaded for inference
    load_adapter(ours, tmp_path)
    with torch.no_grad():
        first, second = ours(input_ids=ids).logits, ours(input_ids=ids).logits
    assert torch.equal(first, second)  # dropout off: two identical calls agree bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        base = tiny_llama()(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    # float32, the same products summed in another order: |logits| < 10, 1e-5 is ~100 ulps.
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)


# ----- 3. merged 4-bit layers: unmerge restores the original exactly -----

def qlora_layer(seed=0, adapters=("default",)):
    torch.manual_seed(seed)
    base = LinearNF4.from_linear(nn.Linear(128, 32), compute_dtype=torch.float32)
    layer = QLoRALinear.from_layer(base, r=4, alpha=8, adapter_name=adapters[0])
    for name in adapters[1:]:
        layer.add_adapter(name, r=2, alpha=4, activate=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in adapters:
            B = layer.lora_B[name].weight
            B.copy_(torch.randn(B.shape, generator=g) * 0.1)
    return layer


def buffers(layer):
    keys = ("weight_packed", "absmax", "offset", "nested_absmax")
    return {k: getattr(layer.base_layer, k).clone() for k in keys}


def test_qlora_100_merge_unmerge_cycles_are_bit_exact():
    layer = qlora_layer()
    x = torch.randn(3, 128)
    original, out_base = buffers(layer), layer.base_layer(x)
    merged_out = None
    for _ in range(100):
        layer.merge()
        out = layer(x)
        merged_out = out if merged_out is None else merged_out
        assert torch.equal(out, merged_out)  # each merge re-quantizes from the same original
        layer.unmerge()
    assert all(torch.equal(buffers(layer)[k], v) for k, v in original.items())
    assert torch.equal(layer.base_layer(x), out_base)


def test_disable_adapters_blocks_on_merged_qlora_do_not_accumulate():
    torch.manual_seed(0)
    model = nn.Sequential(LinearNF4.from_linear(nn.Linear(128, 32), compute_dtype=torch.float32))
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["0"]))
    randomize_b(model, std=0.1)
    x = torch.randn(3, 128)
    base_out = model[0].base_layer(x)
    model[0].merge()
    merged_out, merged_codes = model(x), model[0].base_layer.weight_packed.clone()
    for _ in range(10):
        with disable_adapters(model):
            assert torch.equal(model(x), base_out)
    assert torch.equal(model(x), merged_out)
    assert torch.equal(model[0].base_layer.weight_packed, merged_codes)


def test_qlora_merging_one_by_one_equals_merging_together_and_unmerge_restores_all():
    one_by_one, together = qlora_layer(adapters=("a", "b")), qlora_layer(adapters=("a", "b"))
    original = buffers(one_by_one)
    one_by_one.merge(adapter_names=["a"])
    one_by_one.merge(adapter_names=["b"])
    together.merge(adapter_names=["a", "b"])
    assert torch.equal(one_by_one.base_layer.weight_packed, together.base_layer.weight_packed)
    one_by_one.unmerge()
    assert one_by_one.merged_adapters == []
    assert all(torch.equal(buffers(one_by_one)[k], v) for k, v in original.items())


# ----- 4. shared modules and tied weights -----

class Shared(nn.Module):
    """One linear registered as `a` and `b`, applied twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = self.a

    def forward(self, x):
        return self.b(self.a(x))


def test_shared_module_targeted_by_its_second_name_gets_one_wrapper():
    model = Shared()
    x = torch.randn(2, 4)
    assert apply_lora(model, LoRAConfig(r=2, target_modules=["b"])) == ["a"]
    assert isinstance(model.a, LoRALinear) and model.a is model.b
    randomize_b(model)
    expected = model(x)
    merge_and_unload(model)  # merged once, into the one weight both names use
    assert type(model.a) is nn.Linear and model.a is model.b
    # float32, merged vs unmerged: inputs ~1, 8-term sums, two layers: 1e-5 is ~100 ulps.
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_shared_module_excluded_under_one_name_is_refused():
    with pytest.raises(ValueError, match=r"names \['a', 'b'\] \(shared\): \['b'\] are targeted but \['a'\] excluded"):
        apply_lora(Shared(), LoRAConfig(r=2, target_modules=["b"], exclude_modules=["a"]))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tie_word_embeddings

    def forward(self, ids):
        return self.head(self.embed(ids))


@pytest.mark.parametrize("targets", [["embed", "head"], ["head"]])
def test_merge_into_tied_weight_is_refused_naming_both(targets):
    model = Tied()
    apply_lora(model, LoRAConfig(r=2, target_modules=targets))
    randomize_b(model)
    before = model.embed.weight.clone() if "embed" not in targets else model.embed.base_layer.weight.clone()
    with pytest.raises(ValueError, match=r"cannot merge into (embed|head): its base weight is tied .*'(head|embed)"):
        merge_and_unload(model)
    with pytest.raises(ValueError, match=r"cannot merge into head: .*tied .*embed"):
        model.head.merge()
    weight = model.head.base_layer.weight
    assert torch.equal(weight, before) and not model.head.merged  # nothing written


# ----- 5. the memory estimator and its command line -----

@pytest.mark.parametrize("kwargs, pattern", [
    (dict(method="qlora", blocksize=-64), r"blocksize must be one of"),
    (dict(dropout=-3.0), r"dropout must be a number in \[0, 1\)"),
    (dict(act_dtype="int3"), r"act_dtype must be a torch dtype"),
    (dict(adapter_dtype="int8"), r"adapter_dtype must be a torch dtype"),
    (dict(double_quant="yes"), r"double_quant must be a bool"),
    (dict(target_modules="("), r"target_modules='\(' is not a valid regular expression"),
    (dict(target_modules=["q_proj", "wq"]), r"target_modules: \['wq'\] are not Llama linear layers"),
    (dict(r=0), r"r must be a positive int"),
])
def test_estimate_errors_name_the_argument(kwargs, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        estimate("smollm2-135m", **kwargs)


def test_estimate_error_types_are_exact():
    with pytest.raises(TypeError, match=r"grad_checkpointing must be a bool"):
        estimate("smollm2-135m", grad_checkpointing="no")
    with pytest.raises(TypeError, match=r"model_or_config must be an nn.Module, a ModelSpec"):
        estimate(None)
    with pytest.raises(ValueError, match=r"blocksize must be one of"):
        nf4_storage_bytes(1000, blocksize=0)  # was ZeroDivisionError


def test_target_modules_str_is_one_name_not_characters():
    one = estimate("smollm2-135m", target_modules="q_proj")
    assert one.trainable_params == estimate("smollm2-135m", target_modules=["q_proj"]).trainable_params
    assert one.activations == estimate("smollm2-135m", target_modules=["q_proj"]).activations
    # a regex over the Hugging Face path, as LoRAConfig: q and v of every block
    regex = estimate("smollm2-135m", target_modules=r".*\.(q|v)_proj")
    assert regex.trainable_params == estimate("smollm2-135m", target_modules=["q_proj", "v_proj"]).trainable_params


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(hidden_size=-8), ValueError, r"hidden_size must be a positive int"),
    (dict(tie_word_embeddings="yes"), TypeError, r"tie_word_embeddings must be a bool"),
])
def test_model_spec_checks_every_field(kwargs, exc, pattern):
    fields = dict(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16, vocab_size=10)
    with pytest.raises(exc, match=pattern):
        ModelSpec(**(fields | kwargs))


@pytest.mark.parametrize("argv, pattern", [
    (["--r", "0"], r"argument --r: must be a positive int, got '0'"),
    (["--batch-size", "-4"], r"argument --batch-size: must be a positive int"),
    (["--weight-dtype", "int3"], r"argument --weight-dtype: invalid choice: 'int3'"),
    (["--seq-len", "x"], r"argument --seq-len: must be a positive int"),
])
def test_cli_bad_arguments_exit_2_with_one_line(argv, pattern, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err
    assert re.search(pattern, err), err


# ----- 6. errors that name the argument, and safe_merge blaming the right part -----

def test_safe_merge_blames_a_nan_base_not_the_adapter():
    model = lora_mlp()
    randomize_b(model)
    with torch.no_grad():
        model[2].base_layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"base weight of 2 is not finite"):
        merge_and_unload(model, safe_merge=True)
    assert isinstance(model[0], LoRALinear) and not model[0].merged  # checked before anything merged


def test_safe_merge_catches_overflow_after_the_cast_to_float16():
    layer = LoRALinear.from_layer(nn.Linear(4, 4).half(), r=1, alpha=1)
    with torch.no_grad():
        layer.base_layer.weight.fill_(60000.0)  # float16 max is 65504
        layer.lora_A["default"].weight.fill_(1.0)
        layer.lora_B["default"].weight.fill_(10000.0)
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match=r"would write non-finite values \(overflow in torch.float16\)"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: energy_captured(torch.empty(4, 4, device="meta"), 2), ValueError, r"M is on the meta device"),
    (lambda: effective_rank(torch.empty(4, 4, device="meta")), ValueError, r"M is on the meta device"),
    (lambda: truncate(torch.empty(2, 4, device="meta"), torch.empty(4, 2, device="meta"), 1), ValueError,
     r"A is on the meta device"),
    (lambda: subspace_similarity(torch.zeros(2, 6), torch.randn(2, 6), 1, 1), ValueError, r"A1 is all zeros"),
    (lambda: LoRALinear(4, 4, device="meta").merge(), ValueError, r"base weight is on the meta device"),
    (lambda: LoRALinear.from_layer(nn.LazyLinear(3)), ValueError, r"base_layer: LazyLinear has in_features=0"),
    (lambda: LoRALinear(4, 5, base_layer=nn.Linear(3, 5)), ValueError, r"do not match base_layer Linear"),
    (lambda: LoRALinear(in_features=0, out_features=3), ValueError, r"in_features must be a positive int"),
    (lambda: LoRALinear.from_layer(nn.Conv2d(2, 2, 1)), TypeError, r"base_layer must be linear-like"),
    (lambda: LoRALinear(4, 4).merge(adapter_names=["nope"]), ValueError, r"adapter_names: 'nope' not found"),
    (lambda: LoRALinear(4, 4).merge(adapter_names=7), TypeError, r"adapter_names must be an adapter name"),
    (lambda: set_adapter(lora_mlp(), []), ValueError, r"adapter_names must name at least one adapter"),
    (lambda: LoRALinear(4, 4).set_adapter(None), TypeError, r"adapter_names must be an adapter name"),
    (lambda: LoRALinear(4, 4, dtype=torch.int8), TypeError, r"dtype must be a floating torch.dtype"),
    (lambda: LoRALinear(4, 4, rslora="no"), TypeError, r"rslora must be a bool"),
    (lambda: LoRALinear(4, 4).get_delta_weight("nope"), ValueError, r"adapter_name 'nope' not found"),
    (lambda: LoRAEmbedding.from_layer(nn.Embedding(3, 3), dropout=-1.0), ValueError, r"dropout must be"),
], ids=["energy_meta", "rank_meta", "truncate_meta", "zero_A", "merge_meta", "lazy_linear", "shape_mismatch",
        "in_features_0", "conv2d", "merge_unknown", "merge_int", "set_adapter_empty", "set_adapter_none",
        "int_dtype", "rslora_str", "delta_unknown", "embedding_dropout"])
def test_unclear_errors_become_clear(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_merge_with_one_str_name_merges_that_adapter():
    layer = LoRALinear(4, 4)
    layer.merge(adapter_names="default")  # was split into 'd', 'e', ... and "not found"
    assert layer.merged_adapters == ["default"]


@pytest.mark.parametrize("field, value, pattern", [
    ("target_modules", "(", r"target_modules.*'\(' is not a valid regular expression"),
    ("exclude_modules", "[", r"exclude_modules.*'\[' is not a valid regular expression"),
    ("dropout", "0.1", r"dropout must be a float in \[0, 1\)"),
    ("r", 2.5, r"r must be a positive int"),
])
def test_config_edited_after_construction_is_checked_at_apply_time(field, value, pattern):
    config = LoRAConfig(r=2, target_modules=["0"])
    setattr(config, field, value)  # dataclass fields can be edited after __post_init__ ran
    model = mlp()
    with pytest.raises(ValueError, match=pattern):
        apply_lora(model, config)
    assert type(model[0]) is nn.Linear


def test_delete_adapter_merged_somewhere_changes_nothing():
    model = lora_mlp()
    model[2].merge()
    with pytest.raises(ValueError, match=r"adapter 'default' is merged in \['2'\]"):
        delete_adapter(model, "default")
    assert "default" in model[0].r and "default" in model[2].r


def test_copy_of_eval_model_keeps_eval_adapters():
    model = copy.deepcopy(mlp()).eval()
    apply_lora(model, LoRAConfig(r=2, dropout=0.5, target_modules=["0"]))
    randomize_b(model)  # a nonzero B, so dropout in training mode would change the output
    x = torch.randn(3, 8)
    assert torch.equal(model(x), model(x))


# ----- more of the same families -----

def test_bfloat16_disable_adapters_blocks_restore_the_base_weight_bit_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64).to(torch.bfloat16))
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["0"]))
    randomize_b(model, std=0.1)
    model[0].keep_premerge_weight = True  # opt in: one more weight's memory while merged
    original = model[0].base_layer.weight.clone()
    model[0].merge()
    merged = model[0].base_layer.weight.clone()
    for _ in range(10):  # subtracting the delta again moves ~1/4 of the weights by an ulp
        with disable_adapters(model):
            assert torch.equal(model[0].base_layer.weight, original)
    assert torch.equal(model[0].base_layer.weight, merged)


def test_dense_merge_keeps_no_copy_by_default_and_unmerges_within_rounding():
    """PEFT's behaviour by default: no second copy of the weight; unmerge subtracts, so the
    base comes back to within two bf16 roundings of the merged value (2 * 2**-8 relative)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64).to(torch.bfloat16))
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["0"]))
    randomize_b(model, std=0.1)
    original = model[0].base_layer.weight.clone()
    model[0].merge()
    assert model[0]._premerge_weight is None
    merged = model[0].base_layer.weight.float()
    model[0].unmerge()
    restored = model[0].base_layer.weight.float()
    bound = 2 * 2.0 ** -8 * torch.maximum(merged.abs(), original.float().abs())
    assert ((restored - original.float()).abs() <= bound).all()


def test_dora_with_a_zero_weight_row_gives_no_nan():
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    with torch.no_grad():
        base.weight[1] = 0.0  # a pruned output row: ||W||_row = 0, so m = 0 and m / n was 0 / 0
    layer = LoRALinear.from_layer(base, r=2, dora=True)
    x = torch.randn(2, 4)
    # A fresh DoRA adapter equals its base; float32 with the row norm from the expanded
    # square (see lora.dora): 1e-6 is a few ulps of outputs of size ~1.
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=1e-6)
    layer.merge()
    assert torch.isfinite(layer.base_layer.weight).all() and not layer.base_layer.weight[1].any()


@pytest.mark.parametrize("ids, exc, pattern", [
    (torch.tensor([0.5]), TypeError, r"x must be a tensor of integer token ids, got torch.float32"),
    (torch.tensor([7]), ValueError, r"x holds token ids outside \[0, 5\) \(num_embeddings\)"),
    (torch.tensor([-1]), ValueError, r"x holds token ids outside \[0, 5\)"),
])
def test_embedding_ids_are_checked(ids, exc, pattern):
    with pytest.raises(exc, match=pattern):
        LoRAEmbedding(5, 3)(ids)


def test_two_wrappers_around_one_base_layer_refuse_to_merge():
    base = nn.Linear(4, 4)
    model = nn.ModuleDict({"p": LoRALinear.from_layer(base), "q": LoRALinear.from_layer(base, adapter_name="b")})
    with pytest.raises(ValueError, match=r"cannot merge into p: .*tied .*\['q.base_layer'\]"):
        merge_and_unload(model)


@pytest.mark.parametrize("call", [
    lambda: delete_adapter(3, "default"),
    lambda: merge_and_unload("model"),
    lambda: disable_adapters(None).__enter__(),
    lambda: set_adapter([nn.Linear(2, 2)], "default"),
], ids=["delete", "merge_and_unload", "disable", "set_adapter"])
def test_model_functions_name_a_non_module(call):
    with pytest.raises(TypeError, match=r"model must be an nn.Module"):
        call()


def test_shared_module_adapter_round_trips_through_files(tmp_path):
    trained = Shared()
    apply_lora(trained, LoRAConfig(r=2, target_modules=["a", "b"]))
    randomize_b(trained)
    save_adapter(trained, tmp_path)
    fresh = Shared()
    load_adapter(fresh, tmp_path)
    assert fresh.a is fresh.b and isinstance(fresh.a, LoRALinear)
    x = torch.randn(2, 4)
    assert torch.equal(fresh(x), trained(x))  # same weights, same float32 ops: bit-equal


def test_memory_helpers_check_their_arguments():
    from lora.memory import code_book_bytes, tensor_bytes
    from lora.reference import assert_close
    with pytest.raises(TypeError, match=r"double_quant must be a bool"):
        code_book_bytes("yes")
    with pytest.raises(TypeError, match=r"model must be an nn.Module"):
        tensor_bytes([torch.zeros(2)])
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        assert_close(torch.zeros(2), torch.zeros(2), torch.int8)


def test_qlora_safe_merge_blames_a_nan_base_and_writes_nothing():
    layer = qlora_layer()
    with torch.no_grad():
        layer.base_layer.nested_absmax[0] = float("nan")  # every dequantized weight of that block is nan
    before = buffers(layer)
    with pytest.raises(ValueError, match=r"base weight of this QLoRALinear is not finite"):
        layer.merge(safe_merge=True)
    after = buffers(layer)
    assert not layer.merged
    # nan != nan, so the poisoned nested_absmax is compared by its bits
    assert all(torch.equal(after[k], before[k]) for k in ("weight_packed", "absmax", "offset"))
    assert torch.equal(after["nested_absmax"].view(torch.int32), before["nested_absmax"].view(torch.int32))


def test_qlora_merge_and_unload_after_merge_starts_from_the_original_weight():
    layer = qlora_layer()
    exact = layer.base_layer.dequantize(torch.float32) + layer.get_delta_weight("default").float()
    layer.merge()  # the 4-bit base now holds the re-quantized sum ...
    dense = layer.merge_and_unload()  # ... but the dense layer is built from the kept original
    assert torch.equal(dense.weight, exact)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_linear_under_bf16_autocast_matches_float32_within_bf16_rounding(dora):
    """Autocast casts the matmul inputs to bf16 (2**-8 relative each) and rounds each product
    sum once more, so every output is within 4 * 2**-8 of the float32 result times the sum of
    absolute products it is built from. (The in-place addmm_ used to raise a dtype error.)"""
    torch.manual_seed(0)
    layer = LoRALinear(64, 48, r=4, alpha=8, dora=dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad is not None and layer.lora_A["default"].weight.grad is not None
    with torch.no_grad():
        exact = layer(x)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        W = layer.base_layer.weight
        magnitude = x.abs() @ W.abs().T + layer.scaling["default"] * (x.abs() @ A.abs().T) @ B.abs().T
        if dora:  # y = Wx + (c - 1) Wx + c sBAx with the row scale c = m / ||W + sBA||: (1 + 2|c|) terms
            c = layer.lora_magnitude_vector["default"].weight / layer.row_norm("default")  # (out,)
            magnitude = magnitude * (1 + 2 * c.abs())
        bound = 4 * 2.0 ** -8 * (magnitude + layer.base_layer.bias.abs())
        assert ((y.float() - exact).abs() <= bound).all()
