"""The README's "your own layer type" example runs as printed, and the layer it defines behaves:
a float64 reference of its forward, gradients, merge, disable and files.

The block is found by its `register_lora_layer(Dense, LoRADense)` line, executed as is, and its
registration undone afterwards so no other test sees the type.
"""
import copy
import re
from pathlib import Path

import pytest
import torch

from lora import disable_adapters, load_adapter, merge_and_unload, save_adapter
from lora.reference import assert_close
from lora.registry import LINEAR_LIKE_TYPES, LORA_LAYER_TYPES

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if "register_lora_layer(Dense, LoRADense)" in b]
    assert len(found) == 1, "README.md must hold exactly one python block registering Dense -> LoRADense"
    return found[0]


@pytest.fixture
def example():
    namespace: dict = {}
    try:
        torch.manual_seed(0)
        exec(compile(_example(), "README.md (own layer type)", "exec"), namespace)  # noqa: S102 (our own README)
        yield namespace
    finally:
        dense = namespace.get("Dense")
        LORA_LAYER_TYPES.pop(dense, None)
        LINEAR_LIKE_TYPES.discard(dense)


def test_readme_own_layer_type_runs_and_matches_a_dense_reference(example, tmp_path):
    Dense, LoRADense, model = example["Dense"], example["LoRADense"], example["model"]
    assert isinstance(model[0], LoRADense) and isinstance(model[2], LoRADense)
    # the base as it was (the example wraps in place)
    base = torch.nn.Sequential(copy.deepcopy(model[0].base_layer), torch.nn.ReLU(), copy.deepcopy(model[2].base_layer))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in (0, 2):
            model[i].lora_B["default"].weight.copy_(torch.randn(model[i].lora_B["default"].weight.shape, generator=g))
    x = torch.randn(4, 6, generator=g)
    # float64 reference: kernel + scaling * (B A)^T per layer (scaling = alpha / r = 2)
    leaves = {i: [t.detach().double().requires_grad_(True) for t in
                  (model[i].lora_A["default"].weight, model[i].lora_B["default"].weight)] for i in (0, 2)}
    h = x.double()
    for i in (0, 2):
        A, B = leaves[i]
        h = h @ (model[i].base_layer.kernel.double() + 2.0 * (B @ A).T) + model[i].base_layer.bias.double()
        h = torch.relu(h) if i == 0 else h
    out = model(x)
    assert_close(out, h, torch.float32)
    out.sum().backward()
    h.sum().backward()
    for i in (0, 2):
        for got, want in zip((model[i].lora_A["default"].weight, model[i].lora_B["default"].weight), leaves[i], strict=True):
            assert_close(got.grad, want.grad, torch.float32)
    with torch.no_grad():
        with disable_adapters(model):
            assert_close(model(x), base(x).double(), torch.float32)
        save_adapter(model, tmp_path)
        fresh = copy.deepcopy(base)
        load_adapter(fresh, tmp_path)
        assert_close(fresh(x), out.double(), torch.float32)
        merge_and_unload(model)
        assert type(model[0]) is Dense
        assert_close(model(x), out.double(), torch.float32)
