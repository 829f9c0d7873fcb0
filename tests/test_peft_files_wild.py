"""PEFT adapter files as found in the wild, and PEFT's config names.

- `adapter_model.bin` (PEFT's older pickle format) is read with torch.load(weights_only=True)
  only: a pickle that would run code is refused and never runs;
- files saved with `save_embedding_layers` carry the full input-embedding / output-head
  weights (`...embed_tokens.base_layer.weight`, `...lm_head.weight`), which PEFT copies into
  the model: so does load_adapter, and the logits match PEFT's;
- `LoRAConfig.from_peft` takes PEFT's LoraConfig or a dict of its names and refuses, by name,
  the options this library does not implement.

Tolerance for logits of the same weights computed by PEFT and by this library: both run
fp32 matmuls of width <= 48 through two layers with outputs of magnitude ~1, in different
summation orders; each dot product is off by at most ~K * 2^-24 relative (K = 48 terms),
about 3e-6, so atol = rtol = 1e-5 bounds it with room for the two layers.
"""
import copy
import json
import os
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora import LoRAConfig, apply_lora, load_adapter, trainable_parameters  # noqa: E402
from lora.config import as_lora_config  # noqa: E402
from lora.files import BIN_WEIGHTS_NAME, CONFIG_NAME  # noqa: E402
from lora.layer import LoRALayer  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)  # see the module docstring
IDS = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def llama(tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_model(base, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg)).eval()
    return model


def save_peft(model, folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, **kw)


# ----- adapter_model.bin -----

def test_bin_file_from_peft_loads_to_the_same_logits(tmp_path):
    base = llama()
    theirs = peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    save_peft(theirs, tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, BIN_WEIGHTS_NAME, "README.md"])
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(base), atol=1e-3)  # the adapter matters
    ours = copy.deepcopy(base)
    assert len(load_adapter(ours, tmp_path)) == 4
    torch.testing.assert_close(logits(ours), expected, **TOL)


class _Payload:
    """A pickle that would create a file when unpickled (what weights_only=True must stop)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("content", ["code", "list", "truncated"])
def test_bad_bin_files_are_refused_without_running_anything(tmp_path, content):
    base = llama()
    save_peft(peft_model(base, r=2, target_modules=["q_proj"]), tmp_path, safe_serialization=False)
    marker = tmp_path.parent / f"{tmp_path.name}-ran"
    path = tmp_path / BIN_WEIGHTS_NAME
    if content == "code":
        state = torch.load(path, weights_only=True)
        torch.save({**state, "evil": _Payload(marker)}, path)
    elif content == "list":
        torch.save([torch.zeros(2)], path)
    else:
        path.write_bytes(path.read_bytes()[:100])
    ours = copy.deepcopy(base)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=BIN_WEIGHTS_NAME):
        load_adapter(ours, tmp_path)
    assert not marker.exists()
    assert not any(isinstance(m, LoRALayer) for m in ours.modules())
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


# ----- save_embedding_layers -----

def _new_token_rows(model, generator):
    """What resizing the vocabulary and training new tokens does to the base: other rows."""
    with torch.no_grad():
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            module.weight[-4:] = torch.randn(4, module.weight.shape[1], generator=generator)


@pytest.mark.parametrize("targets", [["q_proj", "embed_tokens"], ["q_proj"]])
def test_files_with_full_embedding_weights_load_like_peft(tmp_path, targets):
    base = llama()
    theirs = peft_model(base, r=4, lora_alpha=8, target_modules=targets)
    _new_token_rows(theirs.get_base_model(), torch.Generator().manual_seed(5))
    save_peft(theirs, tmp_path, save_embedding_layers=True)
    # What PEFT's own loader makes of this file on the original base is the reference (PEFT
    # saves the input embedding, and the head when the embedding is not a target).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval())
    ours = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours), expected, **TOL)
    new_rows = ours.get_input_embeddings().weight[-4:] if "embed_tokens" not in targets else \
        ours.get_input_embeddings().base_layer.weight[-4:]
    assert torch.equal(new_rows, theirs.get_base_model().get_input_embeddings().weight[-4:]
                       if "embed_tokens" not in targets else
                       theirs.get_base_model().get_input_embeddings().base_layer.weight[-4:])


def test_other_base_weights_in_a_file_are_still_unexpected(tmp_path):
    from safetensors.torch import load_file, save_file

    base = llama()
    save_peft(peft_model(base, r=2, target_modules=["q_proj"]), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] = torch.zeros(32, 32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.0.self_attn.q_proj.base_layer.weight'\]"):
        load_adapter(copy.deepcopy(base), tmp_path)


# ----- LoRAConfig.from_peft -----

def test_from_peft_reads_peft_names_from_an_object_and_a_dict():
    theirs = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, use_dora=True,
                             target_modules={"q_proj", "v_proj"}, modules_to_save=["lm_head"],
                             rank_pattern={"v_proj": 2}, init_lora_weights="gaussian")
    want = LoRAConfig(r=4, alpha=16, dropout=0.1, rslora=True, dora=True, target_modules=["q_proj", "v_proj"],
                      modules_to_save=["lm_head"], rank_pattern={"v_proj": 2}, init="gaussian")
    assert LoRAConfig.from_peft(theirs) == want
    assert LoRAConfig.from_peft({"r": 4, "lora_alpha": 16, "lora_dropout": 0.1, "use_rslora": True,
                                 "use_dora": True, "target_modules": ["q_proj", "v_proj"],
                                 "modules_to_save": ["lm_head"], "rank_pattern": {"v_proj": 2},
                                 "init_lora_weights": "gaussian"}) == want
    assert LoRAConfig.from_peft(peft.LoraConfig(**want.to_peft_dict())) == want  # round trip


def test_from_peft_gives_the_same_trainable_parameters_as_peft():
    theirs = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True)
    ours = llama()
    apply_lora(ours, LoRAConfig.from_peft(theirs))
    assert trainable_parameters(ours) == peft_model(llama(), **{k: v for k, v in theirs.to_dict().items()
                                                                 if k in ("r", "lora_alpha", "target_modules")}
                                                    ).get_nb_trainable_parameters()


@pytest.mark.parametrize("option,words", [
    (dict(layer_replication=[[0, 2]]), r"layer_replication=\[\[0, 2\]\] is not supported"),
    (dict(lora_bias=True, use_dora=True), "lora_bias=True works without DoRA"),
    (dict(use_qalora=True), "use_qalora=True is not supported"),
    (dict(init_lora_weights=False), "init_lora_weights=False is not supported"),
    (dict(init_lora_weights="eva"), "init_lora_weights='eva' is not supported"),
    (dict(ensure_weight_tying=True), "ensure_weight_tying=True are not supported"),
    (dict(some_future_option={"on": 1}), r"some_future_option=\{'on': 1\} are not supported"),
    (dict(lora_alpha="8"), "config: lora_alpha"),
])
def test_from_peft_refuses_what_it_does_not_support(option, words):
    with pytest.raises((ValueError, TypeError), match=words):
        LoRAConfig.from_peft({"target_modules": ["q_proj"], **option})


def test_from_peft_ignores_options_that_are_off():
    d = peft.LoraConfig(target_modules=["q_proj"]).to_dict()  # every option, most None / False
    assert LoRAConfig.from_peft(d) == LoRAConfig(target_modules=["q_proj"])
    assert LoRAConfig.from_peft({"target_modules": ["q_proj"], "future_option": None}).r == 8
    with pytest.raises(TypeError, match="already a LoRAConfig"):
        LoRAConfig.from_peft(LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="peft_type must be LORA"):
        LoRAConfig.from_peft(peft.IA3Config(target_modules=["q_proj"]))


def test_a_file_with_an_unknown_option_switched_on_is_refused(tmp_path):
    base = llama()
    save_peft(peft_model(base, r=2, target_modules=["q_proj"]), tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["kasa_config"] = {"rank": 2}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"kasa_config=\{'rank': 2\} are not supported"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_a_peft_config_given_where_ours_is_expected_says_what_to_write():
    with pytest.raises(TypeError, match=r"LoRAConfig.from_peft\(config\).*not `model = apply_lora"):
        as_lora_config(peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="got a dict"):
        as_lora_config({"r": 8})
    cfg = LoRAConfig(target_modules=["q_proj"])
    assert as_lora_config(cfg) is cfg


def test_written_files_stay_inside_the_folder(tmp_path):
    """The .bin reader reads, never writes: the folder is unchanged by a load."""
    base = llama()
    save_peft(peft_model(base, r=2, target_modules=["q_proj"]), tmp_path, safe_serialization=False)
    before = sorted(os.listdir(tmp_path))
    load_adapter(copy.deepcopy(base), tmp_path)
    assert sorted(os.listdir(tmp_path)) == before


def test_tied_embedding_and_head_must_agree_in_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    base = llama(tie=True)
    save_peft(peft_model(base, r=2, target_modules=["q_proj"]), tmp_path, save_embedding_layers=True)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    emb = tensors["base_model.model.model.embed_tokens.weight"]
    tensors["base_model.model.lm_head.weight"] = emb + 1.0  # the same tied tensor, two values
    save_file(tensors, path)
    ours = copy.deepcopy(base)
    with pytest.raises(ValueError, match="one tied weight in this model"):
        load_adapter(ours, tmp_path)
    assert torch.equal(ours.get_input_embeddings().weight, base.get_input_embeddings().weight)
