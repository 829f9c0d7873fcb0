"""Catalogue of bad input over the public API: each case is (callable, exception type,
regex that the message must match, naming the argument or file at fault).

Covers lora (config, layers, injection, adapter files), quant, kernels (launchers called
directly on CPU tensors; Triton runs under TRITON_INTERPRET=1) and the memory estimator.
A second test checks that a failed `load_adapter` leaves the model exactly as it was.
"""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lora.qlora  # noqa: F401  (registers QLoRALinear for LinearNF4 bases)
import loralab_kernels
from lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    delete_adapter,
    load_adapter,
    lora_layers,
    register_lora_layer,
    save_adapter,
    set_adapter,
)
from lora.memory import ModelSpec, estimate
from quant import (
    LinearNF4,
    dequantize_4bit,
    get_code,
    pack_nibbles,
    quantize_4bit,
    quantize_model,
    unpack_nibbles,
)


class Net(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, names=("fc1", "fc2")):
        super().__init__()
        torch.manual_seed(0)
        setattr(self, names[0], nn.Linear(d_in, hidden))
        setattr(self, names[1], nn.Linear(hidden, 4))
        self.names = names

    def forward(self, x):
        return getattr(self, self.names[1])(torch.relu(getattr(self, self.names[0])(x)))


def cfg(**kw) -> LoRAConfig:
    return LoRAConfig(**{"r": 2, "alpha": 4, "target_modules": ["fc1", "fc2"], **kw})


def lora_net() -> Net:
    net = Net()
    apply_lora(net, cfg())
    return net


def saved_adapter(tmp: Path, net: nn.Module | None = None) -> Path:
    """A valid adapter folder for Net (B randomized so loading changes something)."""
    net = net or lora_net()
    with torch.no_grad():
        for _, layer in lora_layers(net):
            layer.lora_B["default"].weight.normal_()
    save_adapter(net, tmp / "adapter")
    return tmp / "adapter"


def bad_adapter(tmp: Path, kind: str) -> Path:
    """An adapter folder with one defect `kind`."""
    d = saved_adapter(tmp)
    weights, config = d / "adapter_model.safetensors", d / "adapter_config.json"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif kind == "garbage":
        weights.write_bytes(b"\x00\xffnot a safetensors file" * 3)
    elif kind == "empty_file":
        weights.write_bytes(b"")
    elif kind == "bad_json":
        config.write_text('{"r": 2, "lora_alpha": ')
    elif kind == "json_list":
        config.write_text("[1, 2]")
    elif kind in ("missing_targets", "other_peft_type", "bad_rank", "bad_dropout"):
        d_cfg = json.loads(config.read_text())
        if kind == "missing_targets":
            del d_cfg["target_modules"]
        elif kind == "other_peft_type":
            d_cfg["peft_type"] = "PREFIX_TUNING"
        elif kind == "bad_rank":
            d_cfg["r"] = 0
        else:
            d_cfg["lora_dropout"] = 1.5
        config.write_text(json.dumps(d_cfg))
    elif kind in ("other_arch_names", "other_arch_shapes"):
        other = Net(names=("enc", "dec")) if kind == "other_arch_names" else Net(d_in=5)
        targets = ["enc", "dec"] if kind == "other_arch_names" else ["fc1", "fc2"]
        apply_lora(other, cfg(target_modules=targets))
        save_adapter(other, d)
    elif kind in ("extra_key", "missing_key"):
        from safetensors.torch import load_file

        tensors = load_file(str(weights))
        if kind == "extra_key":
            tensors["base_model.model.fc3.lora_A.weight"] = torch.zeros(2, 8)
        else:
            tensors.pop(sorted(tensors)[0])
        save_file(tensors, str(weights))
    else:
        raise AssertionError(kind)
    return d


def quantized(shape=(16, 64), blocksize=64):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return quantize_4bit(w, blocksize=blocksize)


def non_contiguous_packed():
    packed, state = quantized()
    spread = torch.zeros(packed.numel() * 2, dtype=torch.uint8)
    spread[::2] = packed.reshape(-1)
    return spread[::2], state  # right size and values, stride 2


def kernel_x(shape=(3, 64), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def nan_linear() -> nn.Linear:
    linear = nn.Linear(64, 4)
    with torch.no_grad():
        linear.weight[1, 3] = NAN
    return linear


def inf_b_layer() -> LoRALinear:
    layer = LoRALinear(4, 4)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(math.inf)
    return layer


def apply_twice():
    net = lora_net()
    apply_lora(net, cfg())


def layer_twice():
    net = lora_net()
    apply_lora(net, cfg(), adapter_name="second")  # a second name is fine ...
    net.fc1.add_adapter("second", r=2)  # ... but not twice on one layer


def merged_then_load(tmp):
    net = lora_net()
    d = saved_adapter(tmp, copy.deepcopy(net))
    net.fc1.merge()
    load_adapter(net, d)


NAN = float("nan")
# id -> (callable(tmp), exception type, regex on the message)
CASES = {
    # ----- LoRAConfig -----
    "config_r_zero": (lambda t: cfg(r=0), ValueError, r"\br must be a positive int"),
    "config_r_negative": (lambda t: cfg(r=-3), ValueError, r"\br must be a positive int"),
    "config_r_float": (lambda t: cfg(r=2.5), ValueError, r"\br must be a positive int"),
    "config_alpha_negative": (lambda t: cfg(alpha=-1.0), ValueError, r"alpha must be a finite number >= 0"),
    "config_alpha_nan": (lambda t: cfg(alpha=NAN), ValueError, r"alpha must be a finite number"),
    "config_alpha_inf": (lambda t: cfg(alpha=math.inf), ValueError, r"alpha must be a finite number"),
    "config_dropout_one": (lambda t: cfg(dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\)"),
    "config_dropout_negative": (lambda t: cfg(dropout=-0.1), ValueError, r"dropout must be a float in \[0, 1\)"),
    "config_bias_mode": (lambda t: cfg(bias="some"), ValueError, r"bias must be one of"),
    "config_init_mode": (lambda t: cfg(init="xavier"), ValueError, r"init must be one of"),
    "config_missing_targets": (lambda t: LoRAConfig(r=2), ValueError, r"target_modules must be given"),
    "config_extra_key": (lambda t: LoRAConfig(r=2, target_modules=["fc1"], lora_rank=4), TypeError, r"lora_rank"),
    "config_targets_type": (lambda t: cfg(target_modules=3), TypeError, r"target_modules must be"),
    "config_rank_pattern": (lambda t: cfg(rank_pattern={"fc1": 0}), ValueError, r"rank_pattern\['fc1'\].*\br must"),
    # ----- layers -----
    "layer_in_features_zero": (lambda t: LoRALinear(0, 4), ValueError, r"in_features must be a positive int"),
    "layer_out_features_bool": (lambda t: LoRALinear(4, True), ValueError, r"out_features must be a positive int"),
    "layer_r_zero": (lambda t: LoRALinear(4, 4, r=0), ValueError, r"\br must be a positive int"),
    "layer_alpha_nan": (lambda t: LoRALinear(4, 4, alpha=NAN), ValueError, r"alpha must be a finite"),
    "layer_dropout_above_one": (lambda t: LoRALinear(4, 4, dropout=2.0), ValueError, r"dropout must be"),
    "layer_wrap_lora_twice": (lambda t: LoRALinear.from_layer(LoRALinear(4, 4)), ValueError, r"base_layer is already a LoRA layer"),
    "layer_wrap_conv2d": (lambda t: LoRALinear.from_layer(nn.Conv2d(3, 3, 1)), TypeError, r"base_layer must be linear-like"),
    "layer_same_adapter_twice": (lambda t: layer_twice(), ValueError, r"adapter_name 'second' already exists"),
    "layer_merge_unknown": (lambda t: LoRALinear(4, 4).merge(adapter_names=["nope"]), ValueError, r"adapter_names: 'nope' not found"),
    "layer_safe_merge_non_finite": (lambda t: inf_b_layer().merge(safe_merge=True), ValueError, r"merging adapter 'default' would write non-finite values"),
    "layer_input_last_dim": (lambda t: LoRALinear(8, 4)(torch.randn(5, 7)), ValueError, r"x must have last dimension"),
    "qlora_base_not_nf4": (lambda t: lora.qlora.QLoRALinear.from_layer(nn.Linear(64, 4)), TypeError, r"base_layer must be a quant.LinearNF4"),
    # ----- injection -----
    "apply_targets_match_nothing": (lambda t: apply_lora(Net(), cfg(target_modules=["attn"])), ValueError, r"target_modules=\['attn'\] matched no module"),
    "apply_regex_matches_nothing": (lambda t: apply_lora(Net(), cfg(target_modules="q_.*")), ValueError, r"target_modules='q_\.\*' matched no module"),
    "apply_twice_same_name": (lambda t: apply_twice(), ValueError, r"adapter_name 'default' is already applied"),
    "apply_unwrappable_module": (lambda t: apply_lora(nn.Sequential(nn.ReLU()), cfg(target_modules=["0"])), ValueError, r"target_modules=\['0'\] matched modules LoRA cannot wrap"),
    "apply_config_dict": (lambda t: apply_lora(Net(), {"r": 2}), TypeError, r"config must be a LoRAConfig"),
    "apply_model_not_module": (lambda t: apply_lora("net", cfg()), TypeError, r"model must be an nn.Module"),
    "set_adapter_unknown": (lambda t: set_adapter(lora_net(), "nope"), ValueError, r"adapter_names \['nope'\] not found"),
    "delete_adapter_unknown": (lambda t: delete_adapter(lora_net(), "nope"), ValueError, r"adapter_name 'nope' not found"),
    "register_not_module": (lambda t: register_lora_layer(int, LoRALinear), TypeError, r"base_cls must be an nn.Module"),
    "modules_to_save_nothing": (lambda t: apply_lora(Net(), cfg(modules_to_save=["head"])), ValueError, r"modules_to_save=\['head'\] matched no module"),
    # ----- adapter files -----
    "save_without_adapters": (lambda t: save_adapter(Net(), t / "a"), ValueError, r"model has no (LoRA )?adapters"),
    "save_unknown_adapter_name": (lambda t: save_adapter(lora_net(), t / "a", ["nope"]), ValueError, r"adapter_names \['nope'\] not found"),
    "load_missing_folder": (lambda t: load_adapter(Net(), t / "absent"), FileNotFoundError, r"absent.adapter_config.json not found"),
    "load_truncated_safetensors": (lambda t: load_adapter(Net(), bad_adapter(t, "truncated")), ValueError, r"directory: .*adapter_model.safetensors is not a readable safetensors"),
    "load_garbage_safetensors": (lambda t: load_adapter(Net(), bad_adapter(t, "garbage")), ValueError, r"directory: .*adapter_model.safetensors is not a readable safetensors"),
    "load_empty_safetensors": (lambda t: load_adapter(Net(), bad_adapter(t, "empty_file")), ValueError, r"directory: .*adapter_model.safetensors is not a readable safetensors"),
    "load_bad_json": (lambda t: load_adapter(Net(), bad_adapter(t, "bad_json")), ValueError, r"directory: .*adapter_config.json is not valid JSON"),
    "load_json_not_object": (lambda t: load_adapter(Net(), bad_adapter(t, "json_list")), ValueError, r"adapter_config.json must hold a JSON object"),
    "load_config_missing_targets": (lambda t: load_adapter(Net(), bad_adapter(t, "missing_targets")), ValueError, r"target_modules must be given"),
    "load_config_other_peft_type": (lambda t: load_adapter(Net(), bad_adapter(t, "other_peft_type")), ValueError, r"peft_type must be 'LORA'"),
    "load_config_bad_rank": (lambda t: load_adapter(Net(), bad_adapter(t, "bad_rank")), ValueError, r"\br must be a positive int"),
    "load_config_bad_dropout": (lambda t: load_adapter(Net(), bad_adapter(t, "bad_dropout")), ValueError, r"dropout must be a float"),
    "load_other_architecture_names": (lambda t: load_adapter(Net(), bad_adapter(t, "other_arch_names")), ValueError, r"target_modules=\['enc', 'dec'\] matched no module of Net"),
    "load_other_architecture_shapes": (lambda t: load_adapter(Net(), bad_adapter(t, "other_arch_shapes")), ValueError, r"wrong shapes .*fc1.lora_A.weight: file \(2, 5\) vs model \(2, 8\)"),
    "load_extra_tensor": (lambda t: load_adapter(Net(), bad_adapter(t, "extra_key")), ValueError, r"unexpected keys \['fc3.lora_A.weight'\]"),
    "load_missing_tensor": (lambda t: load_adapter(Net(), bad_adapter(t, "missing_key")), ValueError, r"missing keys \['fc1.lora_A.weight'\]"),
    "load_into_merged": (merged_then_load, ValueError, r"adapter 'default' is merged in \['fc1'\]; unmerge\(\) before loading"),
    # ----- quant -----
    "quantize_int_tensor": (lambda t: quantize_4bit(torch.ones(64, dtype=torch.int32)), TypeError, r"w must have dtype float32, float16 or bfloat16"),
    "quantize_complex_tensor": (lambda t: quantize_4bit(torch.ones(64, dtype=torch.complex64)), TypeError, r"w must have dtype float32"),
    "quantize_float64": (lambda t: quantize_4bit(torch.ones(64, dtype=torch.float64)), TypeError, r"w must have dtype"),
    "quantize_not_tensor": (lambda t: quantize_4bit([1.0, 2.0]), TypeError, r"w must be a torch.Tensor"),
    "quantize_nan": (lambda t: quantize_4bit(torch.tensor([1.0, NAN] * 64)), ValueError, r"w contains NaN or Inf"),
    "quantize_inf": (lambda t: quantize_4bit(torch.tensor([1.0, math.inf] * 64)), ValueError, r"w contains NaN or Inf"),
    "quantize_empty": (lambda t: quantize_4bit(torch.empty(0, 64)), ValueError, r"w must have at least one element"),
    "quantize_blocksize_48": (lambda t: quantize_4bit(torch.ones(96), blocksize=48), ValueError, r"blocksize must be a power of two from 32 to 4096"),
    "quantize_blocksize_8192": (lambda t: quantize_4bit(torch.ones(96), blocksize=8192), ValueError, r"blocksize must be a power of two"),
    "quantize_quant_type": (lambda t: quantize_4bit(torch.ones(64), quant_type="nf5"), ValueError, r"quant_type must be one of"),
    "dequantize_packed_size": (lambda t: dequantize_4bit(quantized()[0][:-1], quantized()[1]), ValueError, r"packed has \d+ bytes"),
    "dequantize_packed_dtype": (lambda t: dequantize_4bit(quantized()[0].float(), quantized()[1]), TypeError, r"packed must be uint8"),
    "dequantize_state_type": (lambda t: dequantize_4bit(quantized()[0], {"absmax": 1}), TypeError, r"state must be a QuantState"),
    "dequantize_out_dtype": (lambda t: dequantize_4bit(*quantized(), dtype=torch.int8), TypeError, r"dtype must be float32, float16 or bfloat16"),
    "pack_float_codes": (lambda t: pack_nibbles(torch.zeros(4)), TypeError, r"codes must be an integer tensor"),
    "pack_codes_over_15": (lambda t: pack_nibbles(torch.tensor([3, 16])), ValueError, r"codes must lie in 0..15"),
    "unpack_numel_too_big": (lambda t: unpack_nibbles(torch.zeros(4, dtype=torch.uint8), numel=9), ValueError, r"numel=9 does not fit 4 packed bytes"),
    "code_unknown": (lambda t: get_code("nf5"), ValueError, r"quant_type must be one of"),
    "linear_nf4_in_features": (lambda t: LinearNF4(0, 4), ValueError, r"in_features must be a positive int"),
    "linear_nf4_compute_dtype": (lambda t: LinearNF4(64, 4, compute_dtype=torch.int8), ValueError, r"compute_dtype must be"),
    "linear_nf4_nan_weight": (lambda t: LinearNF4.from_linear(nan_linear()), ValueError, r"w contains NaN or Inf"),
    "linear_nf4_input_shape": (lambda t: LinearNF4(64, 4)(torch.randn(2, 63)), ValueError, r"x must have last dimension in_features=64"),
    "quantize_model_nothing": (lambda t: quantize_model(Net(), target_modules=["attn"]), ValueError, r"target_modules=\['attn'\] matched no nn.Linear"),
    # ----- kernels (launchers, CPU tensors under the Triton interpreter) -----
    "kernel_dequant_non_contiguous": (lambda t: loralab_kernels.dequantize_nf4(*non_contiguous_packed()), ValueError, r"packed must be contiguous"),
    "kernel_dequant_size_mismatch": (lambda t: loralab_kernels.dequantize_nf4(quantized()[0][:-2], quantized()[1]), ValueError, r"packed has \d+ bytes but state.shape"),
    "kernel_dequant_packed_dtype": (lambda t: loralab_kernels.dequantize_nf4(quantized()[0].to(torch.int16), quantized()[1]), TypeError, r"packed must be uint8"),
    "kernel_dequant_state_type": (lambda t: loralab_kernels.dequantize_nf4(quantized()[0], None), TypeError, r"state must be a quant.QuantState"),
    "kernel_matmul_x_int": (lambda t: loralab_kernels.nf4_matmul(kernel_x().to(torch.int32), *quantized()), TypeError, r"x must have dtype in"),
    "kernel_matmul_x_shape": (lambda t: loralab_kernels.nf4_matmul(kernel_x((3, 32)), *quantized()), ValueError, r"x must have last dimension 64"),
    "kernel_matmul_x_strided": (lambda t: loralab_kernels.nf4_matmul(kernel_x((64, 3)).t(), *quantized()), ValueError, r"x must have unit stride in its last dimension"),
    "kernel_matmul_bias_shape": (lambda t: loralab_kernels.nf4_matmul(kernel_x(), *quantized(), bias=torch.zeros(15)), ValueError, r"bias must have shape \(16,\)"),
    "kernel_matmul_bias_strided": (lambda t: loralab_kernels.nf4_matmul(kernel_x(), *quantized(), bias=torch.zeros(32)[::2]), ValueError, r"bias must be contiguous"),
    "kernel_matmul_in_features": (lambda t: loralab_kernels.nf4_matmul(kernel_x((3, 48)), *quantized((16, 48), blocksize=32)), ValueError, r"in_features \(state.shape\[1\] = 48\) must be a multiple"),
    "kernel_matmul_state_1d": (lambda t: loralab_kernels.nf4_matmul(kernel_x(), *quantized((1024,))), ValueError, r"state.shape must be 2-D"),
    "kernel_grad_dtype": (lambda t: loralab_kernels.nf4_matmul_grad_input(kernel_x((3, 16), torch.float64), *quantized()), TypeError, r"grad_y must have dtype in"),
    "kernel_grad_strided": (lambda t: loralab_kernels.nf4_matmul_grad_input(kernel_x((16, 3)).t(), *quantized()), ValueError, r"grad_y must have unit stride"),
    # ----- memory estimator -----
    "memory_unknown_preset": (lambda t: estimate("gpt-17"), ValueError, r"model_or_config: unknown preset 'gpt-17'"),
    "memory_method": (lambda t: estimate("smollm2-135m", method="dora"), ValueError, r"method must be one of"),
    "memory_optimizer": (lambda t: estimate("smollm2-135m", optimizer="lion"), ValueError, r"optimizer must be one of"),
    "memory_rank_zero": (lambda t: estimate("smollm2-135m", r=0), ValueError, r"\br must be a positive int"),
    "memory_batch_size": (lambda t: estimate("smollm2-135m", batch_size=-1), ValueError, r"batch_size must be a positive int"),
    "memory_weight_dtype": (lambda t: estimate("smollm2-135m", weight_dtype="int3"), ValueError, r"weight_dtype must be a torch dtype"),
    "memory_targets": (lambda t: estimate("smollm2-135m", target_modules=["attn"]), ValueError, r"target_modules: \['attn'\] are not Llama linear layers"),
    "memory_spec_hidden": (lambda t: ModelSpec(0, 2, 2, 2, 8, 10), ValueError, r"hidden_size must be a positive int"),
    "memory_spec_heads": (lambda t: ModelSpec(10, 2, 3, 3, 8, 10), ValueError, r"hidden_size must be divisible by num_heads"),
}

XFAIL: dict[str, str] = {}  # case -> reason, for known bugs awaiting a fix


@pytest.mark.parametrize("case", [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=XFAIL[k]))
                                  if k in XFAIL else k for k in CASES])
def test_bad_input(case, tmp_path):
    fn, exc, pattern = CASES[case]
    with pytest.raises(exc, match=pattern):
        fn(tmp_path)


def test_unmerge_without_merge_warns_and_changes_nothing():
    """Not an error: unmerge() is idempotent (as in PEFT), but a call with nothing merged warns."""
    layer = LoRALinear(4, 4)
    before = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="unmerge"):
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)


def test_catalogue_is_large():
    assert len(CASES) >= 30


def test_good_twins_pass(tmp_path):
    """The fixtures are valid: the same calls with the defect removed succeed."""
    d = saved_adapter(tmp_path)
    net = Net()
    assert load_adapter(net, d) == ["fc1", "fc2"]
    packed, state = quantized()
    torch.testing.assert_close(loralab_kernels.dequantize_nf4(packed, state), dequantize_4bit(packed, state))
    x = kernel_x()
    torch.testing.assert_close(loralab_kernels.nf4_matmul(x, packed, state), x @ dequantize_4bit(packed, state).T,
                               atol=1e-4, rtol=1e-4)
    assert estimate("smollm2-135m").total > 0
    layer = LoRALinear(4, 4)
    layer.merge()
    layer.unmerge()


LOAD_FAILURES = ["truncated", "garbage", "bad_json", "missing_targets", "other_peft_type", "bad_rank",
                 "other_arch_names", "other_arch_shapes", "extra_key", "missing_key"]


def model_state(model: nn.Module) -> dict:
    return {"tensors": {k: v.clone() for k, v in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "configs": copy.deepcopy(getattr(model, "lora_configs", None))}


def assert_same_state(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["configs"] == before["configs"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


@pytest.mark.parametrize("with_adapter", [False, True], ids=["plain", "with_adapter"])
@pytest.mark.parametrize("kind", LOAD_FAILURES)
def test_failed_load_leaves_model_unchanged(tmp_path, kind, with_adapter):
    d = bad_adapter(tmp_path, kind)
    model = lora_net() if with_adapter else Net()
    if with_adapter:
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B["default"].weight.fill_(0.5)
    before = model_state(model)
    with pytest.raises((ValueError, FileNotFoundError)):
        load_adapter(model, d)
    assert_same_state(before, model_state(model))
