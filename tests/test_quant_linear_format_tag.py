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
