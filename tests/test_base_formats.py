"""Adapter files record each layer's base format (metadata `loralab.base_formats`), and an
adapter whose init rewrote its base loads with `rewritten_base=True` only onto a base of the
same format: the rewritten base (LoftQ's Q, a PiSSA residual) is tied to the format it was
quantized to, and any other base gives wrong outputs without an error."""
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lora import LoRAConfig, apply_lora, load_adapter, lora_layers, save_adapter
from lora.files import META_BASE, write_folder
from quant import quantize_model


def _model(bits: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    if bits is not None:
        quantize_model(model, quant_type=f"nf{bits}", compute_dtype=torch.float32)
    return model


def _metadata(folder) -> dict:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return f.metadata()


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_file_records_every_layers_base_format(tmp_path):
    model = _model(4)
    apply_lora(model, LoRAConfig(r=2, target_modules=["0", "2"]))
    save_adapter(model, tmp_path)
    assert json.loads(_metadata(tmp_path)[META_BASE]) == {"0": "nf4:64:1", "2": "nf4:64:1"}
    dense = _model()
    apply_lora(dense, LoRAConfig(r=2, target_modules=["0"]))
    save_adapter(dense, tmp_path / "dense")
    assert json.loads(_metadata(tmp_path / "dense")[META_BASE]) == {"0": "dense"}


def test_a_plain_adapter_moves_between_bases(tmp_path):
    """B = 0 inits (QLoRA's) are not tied to their base: an NF3-trained adapter loads onto NF4 or
    dense bases, as users of PEFT do with QLoRA adapters."""
    model = _model(3)
    apply_lora(model, LoRAConfig(r=2, target_modules=["0", "2"]))
    save_adapter(model, tmp_path)
    for target in (_model(4), _model()):
        assert load_adapter(target, tmp_path) == ["0", "2"]


def test_a_rewritten_base_must_have_the_recorded_format(tmp_path):
    cfg = LoRAConfig(r=2, target_modules=["0", "2"], init="pissa")
    trained = _model()
    apply_lora(trained, cfg)  # PiSSA on the dense base: the residual is the (dense) base
    save_adapter(trained, tmp_path)
    same = _model()
    apply_lora(same, cfg)
    assert load_adapter(same, tmp_path, adapter_name="again", rewritten_base=True) == ["0", "2"]
    quantized = _model(4)  # a base of another format, told to be the rewritten one
    before = _state(quantized)
    with pytest.raises(ValueError, match=r"another format in 2 layers \(0: dense in the file, nf4:64:1 here"):
        load_adapter(quantized, tmp_path, rewritten_base=True)
    after = _state(quantized)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not list(lora_layers(quantized))


def test_files_without_the_record_and_bad_records(tmp_path):
    cfg = LoRAConfig(r=2, target_modules=["0"], init="pissa")
    trained = _model()
    apply_lora(trained, cfg)
    save_adapter(trained, tmp_path)
    from lora import read_adapter

    config, tensors = read_adapter(tmp_path)
    peft_like = tmp_path / "peft_like"  # what PEFT writes: no loralab metadata, nothing to check
    write_folder(peft_like, {"base_model.model." + k: v for k, v in tensors.items()}, config.to_peft_dict())
    assert load_adapter(_model(4), peft_like, rewritten_base=True) == ["0"]
    for text, message in (("{not json", "is not valid JSON"), ('{"0": 4}', "must map layer paths to format")):
        bad = tmp_path / f"bad{len(text)}"
        write_folder(bad, {"base_model.model." + k: v for k, v in tensors.items()}, config.to_peft_dict(),
                     {META_BASE: text})
        with pytest.raises(ValueError, match=message):
            load_adapter(_model(), bad, rewritten_base=True)
