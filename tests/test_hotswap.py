"""Hot swap (lora/hotswap.py): the new adapter's outputs, in place, without recompiling.

Reference: a fresh copy of the base model with the new adapter file loaded by
`load_adapter`. Compilation is counted with dynamo's `CompileCounter` backend (frames
compiled), so a recompilation after the swap fails the test.
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from lora import LoRAConfig, apply_lora, load_adapter, save_adapter
from lora.hotswap import hotswap_adapter, prepare_for_hotswap
from lora.inject import lora_layers


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 12)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 12)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.embed(ids))))


def _base():
    torch.manual_seed(0)
    return Tiny().eval()


def _adapter_file(folder, seed, **cfg):
    """Save an adapter with random non-zero weights; return the folder."""
    model = _base()
    apply_lora(model, LoRAConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for d in layer.adapter_dict_names:
                for p in getattr(layer, d).parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(model, folder)
    return folder


def _reference(folder, ids):
    model = _base()
    load_adapter(model, folder)
    with torch.no_grad():
        return model(ids)


IDS = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))
ALL = ["embed", "fc1", "fc2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp
    return {"x": _adapter_file(d("x"), 1, r=4, alpha=8, target_modules=ALL),
            "y": _adapter_file(d("y"), 2, r=2, alpha=5, target_modules=["fc1", "fc2"]),  # smaller rank, subset
            "z": _adapter_file(d("z"), 3, r=8, alpha=8, rslora=True, target_modules=ALL),  # larger rank
            "w": _adapter_file(d("w"), 4, r=2, alpha=8, target_modules=["fc1", "fc2"], dropout=0.1),
            "v": _adapter_file(d("v"), 5, r=2, alpha=4, target_modules=ALL)}


def _compiled(files):
    model = _base()
    load_adapter(model, files["x"])
    counter = CompileCounter()
    return model, torch.compile(model, backend=counter), counter


def test_swap_smaller_rank_subset_no_recompile(files):
    model, compiled, counter = _compiled(files)
    with torch.no_grad():
        # fp32; the swap adds one rounding to B (scaling folded in, 2^-24 relative): default fp32 tolerances
        torch.testing.assert_close(compiled(IDS), _reference(files["x"], IDS))
        frames = counter.frame_count
        hotswap_adapter(model, files["y"])
        torch.testing.assert_close(compiled(IDS), _reference(files["y"], IDS))
        hotswap_adapter(model, files["x"])  # and back
        torch.testing.assert_close(compiled(IDS), _reference(files["x"], IDS))
    assert counter.frame_count == frames > 0


def test_swap_reaches_cached_kernel_stacks(files):
    """The Triton mixed-batch path caches stacked weights keyed on the parameters' versions;
    a hot swap must invalidate it (interpreter, backend forced)."""
    pytest.importorskip("triton")
    from lora.mixed_batch import use_adapters
    from quant import force_backend

    model = _base()
    load_adapter(model, files["x"])
    with torch.no_grad(), use_adapters(model, ["default", "__base__", "default"]), force_backend("triton"):
        model(IDS)  # fills the cache with x's weights
        hotswap_adapter(model, files["y"])
        got = model(IDS)
    want = _reference(files["y"], IDS)
    torch.testing.assert_close(got[0], want[0])  # default tolerances: float32, one extra rounding in B
    torch.testing.assert_close(got[2], want[2])


def test_larger_rank_needs_padded_slots(files):
    model = _base()
    load_adapter(model, files["x"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="rank 8 .* slot .* rank 4.*prepare_for_hotswap"):
        hotswap_adapter(model, files["z"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing written
    with torch.no_grad():
        want_x = model(IDS)
    prepare_for_hotswap(model, "default", target_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS), want_x)  # padding changes nothing
        frames = counter.frame_count
        hotswap_adapter(model, files["z"])  # rank 8, rsLoRA scaling: folded into B
        torch.testing.assert_close(compiled(IDS), _reference(files["z"], IDS))
    assert counter.frame_count == frames


def test_bad_swaps_raise_and_change_nothing(files, tmp_path):
    model = _base()
    load_adapter(model, files["y"])  # fc1, fc2 only
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="do not carry"):
        hotswap_adapter(model, files["v"])  # has embedding tensors: no slot there
    with pytest.raises(ValueError, match="dropout"):
        hotswap_adapter(model, files["w"])
    with pytest.raises(ValueError, match="not loaded"):
        hotswap_adapter(model, files["x"], adapter_name="other")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for _, layer in lora_layers(model):
        layer.merge()
    with pytest.raises(ValueError, match="merged"):
        hotswap_adapter(model, files["y"])


peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_same_result_as_peft_hotswap(tmp_path):
    """PEFT's `hotswap_adapter` and ours, same two PEFT-written files (rank 4 -> rank 2 with
    another alpha), on a tiny Llama: the same logits."""
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=32, pad_token_id=0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    folders = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed, (r, alpha) in enumerate([(4, 8), (2, 6)]):
            torch.manual_seed(seed)
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
            folders.append(tmp_path / str(seed))
            pm.save_pretrained(folders[-1])
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders[0]).eval()
        peft_hotswap(theirs, str(folders[1]), adapter_name="default", torch_device="cpu")
    ours = copy.deepcopy(base)
    load_adapter(ours, folders[0])
    hotswap_adapter(ours, folders[1])
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_lora_bias_and_parameter_adapters_are_refused_by_name(tmp_path):
    """Their tensors do not follow the slot rules (a bias term; rows of r x experts)."""
    plain = _adapter_file(tmp_path / "plain", 1, r=4, target_modules=["fc1"])
    biased = _adapter_file(tmp_path / "biased", 2, r=4, target_modules=["fc1"], lora_bias=True)
    model = _base()
    load_adapter(model, plain)
    with pytest.raises(ValueError, match="new adapter has a lora_bias"):
        hotswap_adapter(model, biased)
    model = _base()
    load_adapter(model, biased)
    with pytest.raises(ValueError, match="'default' of fc1 has a lora_bias"):
        hotswap_adapter(model, plain)
    model = _base()
    apply_lora(model, LoRAConfig(r=2, target_modules=[], target_parameters=["fc2.weight"]))
    with pytest.raises(ValueError, match=r"fc2 adapts a raw parameter \(target_parameters\)"):
        hotswap_adapter(model, plain)
