"""A Linear4bit state dict records its format (quant type, blocksize, double quant): NF3
codes are valid NF4 codes with other values, so loading them into the wrong layer must fail."""
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from quant import Linear4bit


def layer(quant_type="nf4", blocksize=64, double_quant=True, seed=0):
    torch.manual_seed(seed)
    return Linear4bit.from_linear(nn.Linear(128, 32), quant_type=quant_type, blocksize=blocksize,
                                  double_quant=double_quant, compute_dtype=torch.float32)


@pytest.mark.parametrize("saved, target, pattern", [
    (dict(quant_type="nf3"), dict(quant_type="nf4"), "quant_type=nf3.*this layer has quant_type=nf4"),
    (dict(quant_type="nf4"), dict(quant_type="fp4"), "quant_type=nf4.*this layer has quant_type=fp4"),
    (dict(blocksize=128), dict(blocksize=64), "blocksize=128.*blocksize=64"),
])
def test_another_format_is_refused_before_anything_changes(saved, target, pattern):
    src, dst = layer(**saved), layer(**target, seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=pattern):
        dst.load_state_dict(src.state_dict())
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_same_format_round_trips_through_safetensors(tmp_path):
    src, dst = layer("nf3"), layer("nf3", seed=1)
    save_file(src.state_dict(), tmp_path / "w.safetensors")  # the tag is a tensor: safetensors stores it
    dst.load_state_dict(load_file(tmp_path / "w.safetensors"))
    x = torch.randn(3, 128)
    assert torch.equal(dst(x), src(x))


def test_state_dicts_saved_before_the_tag_still_load():
    src, dst = layer(), layer(seed=1)
    old = {k: v for k, v in src.state_dict().items() if not k.endswith("_extra_state")}
    dst.load_state_dict(old)  # strict: no missing key reported for the tag
    x = torch.randn(2, 128)
    assert torch.equal(dst(x), src(x))


def test_tags_name_the_code_book_revision_only_where_values_changed():
    # NF4/FP4/INT4/INT3/INT2 tags are as they were first written; NF3/NF2 carry revision 2
    # (NF4's outer quantile at every width, quant.codes.CODE_REVISION).
    for qt in ("nf4", "fp4", "int4", "int3", "int2"):
        assert bytes(layer(qt).state_dict()["_extra_state"].tolist()) == f"{qt}:64:1".encode()
    for qt in ("nf3", "nf2"):
        assert bytes(layer(qt, double_quant=False).state_dict()["_extra_state"].tolist()) == f"{qt}:64:0:2".encode()


@pytest.mark.parametrize("qt", ["nf3", "nf2"])
def test_states_of_the_revision_1_code_book_are_refused(qt):
    """NF3/NF2 codes saved before revision 2 stand for other values (NF2's third level was
    0.436, now 0.338): their tag ("nf2:64:1"), or no tag at all, must not load."""
    src, dst = layer(qt), layer(qt, seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    old = src.state_dict()
    old["_extra_state"] = torch.tensor(list(f"{qt}:64:1".encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"saved {qt} weight uses revision 1 of the {qt} code book, this layer "
                                         "revision 2"):
        dst.load_state_dict(old)
    untagged = {k: v for k, v in old.items() if k != "_extra_state"}
    with pytest.raises(ValueError, match=f"saved {qt} weight has no format tag.*revision-1 code book"):
        dst.load_state_dict(untagged)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    dst.load_state_dict(src.state_dict())  # the current revision loads
    assert torch.equal(dst.weight_packed, src.weight_packed)


def test_a_state_without_this_layers_entries_loads_around_it():
    """A partial state dict (strict=False, as a model loader fills the other modules) holds no
    buffers of this layer: nothing to refuse, nothing changes."""
    model = nn.Sequential(layer("nf2"), nn.Linear(32, 8))
    before = model[0].weight_packed.clone()
    model.load_state_dict({"1.weight": torch.zeros(8, 32)}, strict=False)
    assert torch.equal(model[0].weight_packed, before) and torch.all(model[1].weight == 0)
