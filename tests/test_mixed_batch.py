"""Mixed-adapter batches (lora/mixed_batch.py): each row with its own adapter.

Reference: the same layer run on one row at a time with that row's adapter active
(`set_adapter`), or with adapters disabled for "__base__" rows, in float64. Then PEFT's
mixed batch (`adapter_names=`) on a tiny transformers Llama with the same adapter files.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from lora import LoRAEmbedding, LoRALinear, QLoRALinear
from lora.mixed_batch import BASE, enable_adapter_names, use_adapters

NAMES = ["a", BASE, "c", "a", "b"]  # 5 rows: a repeated, a base row, three adapters
RANKS = {"a": 3, "b": 5, "c": 2}
# float64 throughout: the mixed batch and the per-row reference do the same products in a
# different grouping; each output is a sum of <= 20 products of O(1) numbers, so the
# rounding differences are a few ulps of O(10): 1e-12 leaves room and still catches any
# wrong adapter (differences of O(1)).
ATOL64 = 1e-12


class OtherLinear(nn.Linear):
    """Not `nn.Linear` itself, so the layer does not update its output in place (the other path)."""


def _layer(dtype=torch.float64, in_f=9, out_f=11, in_place=True):
    torch.manual_seed(0)
    base = None if in_place else OtherLinear(in_f, out_f)
    layer = LoRALinear(in_f, out_f, r=RANKS["a"], alpha=4, adapter_name="a", dtype=dtype,
                       base_layer=base).to(dtype)
    layer.add_adapter("b", r=RANKS["b"], alpha=7, dtype=dtype)
    layer.add_adapter("c", r=RANKS["c"], alpha=2, rslora=True, dtype=dtype)
    with torch.no_grad():
        for name in RANKS:
            layer.lora_B[name].weight.normal_()
    layer.set_adapter(list(RANKS))  # all trainable
    return layer


def _per_row(layer, x, names):
    """Reference: one row at a time with its adapter active (base rows: adapters disabled)."""
    outs = []
    for i, name in enumerate(names):
        if name == BASE:
            layer.disabled = True
        else:
            layer.set_adapter(name)
        outs.append(layer(x[i:i + 1]))
        layer.disabled = False
    layer.set_adapter(list(RANKS))
    return torch.cat(outs)


def _grads(layer):
    return {(n, k): getattr(layer, k)[n].weight.grad.clone() for n in RANKS for k in ("lora_A", "lora_B")}


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("shape", [(5, 7, 9), (5, 9)])
def test_linear_forward_and_grads_match_rows_alone(shape, in_place):
    layer = _layer(in_place=in_place)
    x = torch.randn(*shape, dtype=torch.float64)
    g = torch.randn(*shape[:-1], 11, dtype=torch.float64)
    want = _per_row(layer, x, NAMES)
    (want * g).sum().backward()
    want_grads = _grads(layer)
    layer.zero_grad()
    with use_adapters(layer, NAMES):
        got = layer(x)
    (got * g).sum().backward()
    torch.testing.assert_close(got, want, atol=ATOL64, rtol=0)
    for key, grad in _grads(layer).items():
        torch.testing.assert_close(grad, want_grads[key], atol=ATOL64, rtol=0, msg=str(key))
    assert want_grads[("b", "lora_A")].abs().sum() > 0  # every adapter got a gradient


def test_flattened_tokens_and_base_rows_equal_base():
    layer = _layer()
    x = torch.randn(5, 4, 9, dtype=torch.float64)
    with use_adapters(layer, NAMES):
        flat = layer(x.reshape(20, 9))  # (tokens, features), row-major
        full = layer(x)
    torch.testing.assert_close(flat.reshape(5, 4, 11), full, atol=0, rtol=0)
    base = layer.base_layer(x[1])
    torch.testing.assert_close(full[1], base, atol=0, rtol=0)  # "__base__" row: exactly the base


@pytest.mark.parametrize("in_place", [True, False])
def test_grouped_rows_take_the_slice_path_and_agree(in_place):
    layer = _layer(in_place=in_place)
    x = torch.randn(4, 3, 9, dtype=torch.float64)
    names = ["b", "b", "a", BASE]  # grouped, base last: no gather/scatter
    with use_adapters(layer, names):
        got = layer(x)
    torch.testing.assert_close(got, _per_row(layer, x, names), atol=ATOL64, rtol=0)


def test_qlora_mixed_batch_matches_rows_alone():
    torch.manual_seed(1)
    layer = QLoRALinear(64, 24, r=4, alpha=8, adapter_name="a", compute_dtype=torch.float32)
    layer.add_adapter("b", r=2, alpha=8)
    layer.add_adapter("c", r=6, alpha=8)
    with torch.no_grad():
        for n in ("a", "b", "c"):
            layer.lora_B[n].weight.normal_()
    layer.set_adapter(["a", "b", "c"])
    x = torch.randn(5, 3, 64)
    with use_adapters(layer, NAMES):
        got = layer(x)
    outs = []
    for i, name in enumerate(NAMES):
        layer.disabled = name == BASE
        if name != BASE:
            layer.set_adapter(name)
        outs.append(layer(x[i:i + 1]))
    layer.disabled = False
    want = torch.cat(outs)
    # float32, the same products summed in another order: each result is within
    # (K + r) * 2^-24 * bound of the exact one (K = 64, r <= 6), bound = |x| |W|^T + s |x| |A|^T |B|^T,
    # so the two differ by at most twice that.
    xa = x.abs().double()
    bound = xa @ layer.base_layer.dequantize(torch.float32).double().abs().T + layer.base_layer.bias.double().abs()
    for n in ("a", "b", "c"):
        A, B = layer.lora_A[n].weight.double().abs(), layer.lora_B[n].weight.double().abs()
        bound = bound + layer.scaling[n] * xa @ A.T @ B.T  # every adapter's term: an upper bound for any row
    assert ((got.double() - want.double()).abs() <= 2 * (64 + 6) * 2.0**-24 * bound).all()


def test_embedding_mixed_batch():
    torch.manual_seed(2)
    layer = LoRAEmbedding(30, 8, r=3, alpha=6, adapter_name="a", dtype=torch.float64).double()
    layer.add_adapter("b", r=5, alpha=5, dtype=torch.float64)
    with torch.no_grad():
        for n in ("a", "b"):
            layer.lora_embedding_A[n].normal_()
    ids = torch.randint(0, 30, (3, 6))
    names = ["b", BASE, "a"]
    with use_adapters(layer, names):
        got = layer(ids)
    outs = []
    for i, name in enumerate(names):
        layer.disabled = name == BASE
        if name != BASE:
            layer.set_adapter(name)
        outs.append(layer(ids[i:i + 1]))
    layer.disabled = False
    torch.testing.assert_close(got, torch.cat(outs), atol=ATOL64, rtol=0)


def test_bad_adapter_names_raise_before_anything_changes():
    layer = _layer()
    x = torch.randn(5, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="adapter_names.*'zzz'.*not found"):
        with use_adapters(layer, ["a", "zzz", "b", "a", "a"]):
            pass
    assert layer.row_adapters is None
    with pytest.raises(TypeError, match="adapter_names"):
        with use_adapters(layer, "a"):
            pass
    with pytest.raises(ValueError, match="adapter_names"):
        with use_adapters(layer, []):
            pass
    with use_adapters(layer, ["a", "b"]):  # 2 names, 5 rows
        with pytest.raises(ValueError, match="adapter_names has 2 entries"):
            layer(x)
        with pytest.raises(ValueError, match="adapter_names has 2 entries"):
            layer(torch.randn(4, 3, 9, dtype=torch.float64))  # leading dim 4 != 2 rows
    layer.merge(adapter_names=["a"])
    with pytest.raises(ValueError, match="adapter_names.*merged"):
        with use_adapters(layer, NAMES):
            pass
    layer.unmerge()
    assert layer.row_adapters is None


def test_base_row_name_is_reserved_as_an_adapter_name(tmp_path):
    """`"__base__"` names the rows without an adapter, so no adapter may carry it: an adapter of
    that name could never run in a mixed batch (its rows would silently get the base)."""
    from lora import LoRAConfig, apply_lora, load_adapter, save_adapter
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        LoRALinear.from_linear(nn.Linear(9, 7), r=2, alpha=2, adapter_name=BASE)
    layer = _layer()
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        layer.add_adapter(BASE, r=2, alpha=2)
    assert BASE not in layer.r
    model = nn.Sequential(nn.Linear(9, 7))
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        apply_lora(model, LoRAConfig(r=2, target_modules=["0"]), adapter_name=BASE)
    assert type(model[0]) is nn.Linear  # nothing changed
    apply_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        load_adapter(model, tmp_path, adapter_name=BASE)


def test_dora_adapter_refused():
    layer = LoRALinear(9, 11, r=2, adapter_name="a", dora=True)
    with pytest.raises(ValueError, match="adapter_names.*DoRA"):
        with use_adapters(layer, ["a"]):
            pass


def test_layer_kwarg_and_model_kwarg():
    layer = _layer()
    x = torch.randn(5, 2, 9, dtype=torch.float64)
    want = _per_row(layer, x, NAMES)
    torch.testing.assert_close(layer(x, adapter_names=NAMES), want, atol=ATOL64, rtol=0)
    with pytest.raises(ValueError, match="adapter_names.*not found"):
        layer(x, adapter_names=["zzz"] * 5)
    torch.testing.assert_close(layer(x, adapter_names=None), layer(x), atol=0, rtol=0)  # the usual forward

    class Swallow(nn.Module):  # forwards nothing to its layers, like a transformers model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, **kwargs):
            return self.inner(x)

    model = Swallow(layer)
    handle = enable_adapter_names(model)
    torch.testing.assert_close(model(x, adapter_names=NAMES), want, atol=ATOL64, rtol=0)
    assert layer.row_adapters is None  # only for that call
    handle.remove()


# ----- the same adapter files as PEFT, on a tiny transformers Llama -----
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """(PEFT model, our model), both holding adapters "a" (r=4, all-linear) and "b" (r=2,
    q/v + embeddings) read from the same files PEFT wrote."""
    from lora import load_adapter

    base = _llama()
    folders = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed, (name, kw) in enumerate({"a": dict(r=4, lora_alpha=8, target_modules="all-linear"),
                                           "b": dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj",
                                                                                        "embed_tokens"])}.items()):
            torch.manual_seed(10 + seed)
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw))
            folders[name] = tmp_path_factory.mktemp(name)
            pm.save_pretrained(folders[name], save_embedding_layers=False)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders["a"], adapter_name="a").eval()
        theirs.load_adapter(folders["b"], adapter_name="b")
    ours = copy.deepcopy(base)
    load_adapter(ours, folders["a"], adapter_name="a")
    load_adapter(ours, folders["b"], adapter_name="b")
    return theirs, ours, base


ROW_NAMES = ["a", "b", BASE, "b"]


def test_equals_peft_mixed_batch_on_llama(llama_pair):
    theirs, ours, base = llama_pair
    ids = torch.randint(1, 64, (4, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = theirs(input_ids=ids, adapter_names=ROW_NAMES).logits
        with use_adapters(ours, ROW_NAMES):
            got = ours(input_ids=ids).logits
        handle = enable_adapter_names(ours)  # PEFT's keyword, through a model that swallows it
        by_keyword = ours(input_ids=ids, adapter_names=ROW_NAMES).logits
        handle.remove()
        base_logits = base(input_ids=ids).logits
    torch.testing.assert_close(by_keyword, got, atol=0, rtol=0)
    assert not torch.allclose(want[0], want[1], atol=1e-3)  # the adapters differ
    # float32, same operations up to grouping; logits O(1): 1e-5 as the file-compat tests.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], base_logits[2], atol=1e-5, rtol=1e-5)


def test_generate_with_mixed_adapters_equals_peft(llama_pair):
    theirs, ours, _ = llama_pair
    ids = torch.randint(1, 64, (4, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = theirs.generate(input_ids=ids, adapter_names=ROW_NAMES, **kw)
        with use_adapters(ours, ROW_NAMES):
            got = ours.generate(input_ids=ids, **kw)
    assert torch.equal(got, want)


def test_serve_example_mixed_batch_equals_adapter_by_adapter():
    """examples/serve.py's two ways of answering agree (greedy tokens) on a tiny in-repo Llama;
    float32 logits differ between the two by rounding only (~1e-7), far below the gaps
    between a random model's top logits."""
    from examples.llama import Llama, LlamaConfig
    from examples.serve import add_random_adapters, generate_rows, mixed, one_by_one

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                              max_seq_len=64)).eval()
    add_random_adapters(model, ["t0", "t1"], r=4, std=0.5)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3, 3]]
    names = ["t1", BASE, "t0", "t1"]
    got = mixed(model, prompts, names, 6, None)
    assert got == one_by_one(model, prompts, names, 6, None)
    from lora import disable_adapters

    with disable_adapters(model):
        base = generate_rows(model, prompts, 6, None)
    assert got[1] == base[1] and got != base  # the base row is the base; adapter rows changed


def test_rows_needing_another_saved_module_copy_are_refused():
    """modules_to_save copies run for the whole batch: rows whose adapter would need another
    copy (or the original) would silently get the active one, so they are refused."""
    from lora import LoRAConfig, apply_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))
    apply_lora(model, LoRAConfig(r=2, target_modules=["0"], modules_to_save=["1"]), "a")
    apply_lora(model, LoRAConfig(r=2, target_modules=["0"], modules_to_save=["1"]), "b")
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match=r"adapter_names: rows with 'b' need a different ModulesToSave at 1"):
        with use_adapters(model, ["a", "b", "a"]):
            model(x)
    with pytest.raises(ValueError, match="'__base__' need a different ModulesToSave"):
        with use_adapters(model, ["a", "__base__", "a"]):
            model(x)
    with use_adapters(model, ["a", "a", "a"]):  # every row on the active copy: fine
        y = model(x)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)


def test_llama_generate_stops_sharing_the_prompt_prefix_in_a_mixed_batch():
    """Rows sharing a prompt prefix have different keys and values under different adapters:
    inside use_adapters, Llama.generate runs every row's prefix itself."""
    from examples.llama import Llama, LlamaConfig
    from examples.serve import add_random_adapters

    torch.manual_seed(1)
    model = Llama(LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                              max_seq_len=64)).eval()
    add_random_adapters(model, ["t0", "t1"], r=4, std=0.5)
    prompts = [[7, 7, 7, 1], [7, 7, 7, 2], [7, 7, 7, 3]]  # a shared 3-token prefix
    names = ["t0", "t1", BASE]
    with use_adapters(model, names):
        auto = model.generate(prompts, max_new_tokens=5)
        explicit = model.generate(prompts, max_new_tokens=5, share_prefix=False)
    assert auto == explicit
    for i, name in enumerate(names):  # each row as if run alone with its adapter
        with use_adapters(model, [name]):
            assert model.generate([prompts[i]], max_new_tokens=5) == [auto[i]]


def test_generate_keyword_equals_rows_alone_and_peft(llama_pair):
    """enable_adapter_names makes generate(adapter_names=...) work (transformers would refuse
    the unknown keyword): greedy tokens equal each prompt generated alone with its adapter,
    and PEFT's generate(adapter_names=...) with the same files."""
    theirs, ours, _ = llama_pair
    ids = torch.randint(1, 64, (4, 5), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    handle = enable_adapter_names(ours)
    try:
        with torch.no_grad():
            got = ours.generate(input_ids=ids, adapter_names=ROW_NAMES, **kw)
            want = theirs.generate(input_ids=ids, adapter_names=ROW_NAMES, **kw)
            alone = []
            for i, name in enumerate(ROW_NAMES):
                with use_adapters(ours, [name]):
                    alone.append(ours.generate(ids[i:i + 1], **kw))
            assert all(layer.row_adapters is None for _, layer in _lora_layers(ours))  # restored
            plain = ours.generate(ids, **kw)  # no keyword: the usual generate
    finally:
        handle.remove()
    assert torch.equal(got, want)
    for i, row in enumerate(alone):  # a prompt alone stops at eos (0); in the batch it is padded with 0
        assert torch.equal(got[i, : row.shape[1]], row[0]) and not got[i, row.shape[1]:].any()
    assert not torch.equal(got, plain)  # the adapters changed something
    assert "generate" not in ours.__dict__  # remove() restored the class method


def test_generate_keyword_with_beams_repeats_names_and_checks_length(llama_pair):
    """num_beams / num_return_sequences repeat every prompt: the names are repeated likewise
    (beam search equals PEFT's); a name list of the wrong length raises before any layer
    changes."""
    theirs, ours, _ = llama_pair
    ids = torch.randint(1, 64, (4, 5), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, num_beams=2, num_return_sequences=2)
    handle = enable_adapter_names(ours)
    try:
        with torch.no_grad():
            got = ours.generate(ids, adapter_names=ROW_NAMES, **kw)
            want = theirs.generate(input_ids=ids, adapter_names=ROW_NAMES, **kw)
            for i, name in enumerate(ROW_NAMES):  # each prompt's 2 sequences as if run alone
                with use_adapters(ours, [name, name]):  # beams expand the rows: one name each
                    alone = ours.generate(ids[i:i + 1], **kw)
                n = alone.shape[1]  # shorter if both beams ended at eos (0), padded with 0 in the batch
                assert torch.equal(got[2 * i:2 * i + 2, :n], alone) and not got[2 * i:2 * i + 2, n:].any()
            with pytest.raises(ValueError, match="adapter_names has 3 entries but generate.. got 4 prompts"):
                ours.generate(ids, adapter_names=ROW_NAMES[:3], max_new_tokens=2, pad_token_id=0)
            with pytest.raises(ValueError, match="adapter_names.*'zzz'.*not found"):
                ours.generate(ids, adapter_names=["zzz"] * 4, max_new_tokens=2, pad_token_id=0)
            assert all(layer.row_adapters is None for _, layer in _lora_layers(ours))
    finally:
        handle.remove()
    assert torch.equal(got, want)


def _lora_layers(model):
    from lora.inject import lora_layers

    return list(lora_layers(model))
