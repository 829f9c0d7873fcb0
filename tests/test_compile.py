"""torch.compile (CPU inductor) over LoRALinear, QLoRALinear and a small model with adapters.

Compiled outputs and gradients must equal eager ones; `fullgraph=True` (no graph break
anywhere) is the goal for the adapter code. Few graphs on purpose: inductor needs a
C++ compiler and takes seconds per graph on two cores.
"""
import shutil

import pytest
import torch
from torch import nn

from lora import LoRAConfig, LoRALinear, apply_lora, lora_layers
from lora.qlora import QLoRALinear

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                                reason="inductor on the CPU needs a C++ compiler")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5)}  # inductor may reorder float32 sums


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def randomize_b(model: nn.Module) -> None:
    """B is zero at init; give it values so the adapter path matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.lora_B:
                w = layer.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g).to(w.dtype))


def lora_linear() -> nn.Module:
    torch.manual_seed(0)
    layer = LoRALinear(33, 40, r=4, alpha=8)
    randomize_b(layer)
    return layer


def qlora_linear() -> nn.Module:
    torch.manual_seed(0)
    layer = QLoRALinear(64, 24, r=4, alpha=8, compute_dtype=torch.float32)
    randomize_b(layer)
    return layer


class SmallModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 48)
        self.norm = nn.LayerNorm(48)
        self.down = nn.Linear(48, 24)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.norm(self.up(x))))


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = SmallModel()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["up", "down"]))
    randomize_b(model)
    return model


CASES = {"lora_linear": (lora_linear, (5, 33)), "qlora_linear": (qlora_linear, (3, 64)),
         "small_model": (small_model, (2, 3, 24))}


def eager_and_compiled(make, shape, **compile_kwargs):
    eager, compiled_module = make(), make()
    compiled = torch.compile(compiled_module, **compile_kwargs)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    return eager, compiled_module, compiled, x


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_equals_eager(case):
    make, shape = CASES[case]
    eager, module, compiled, x = eager_and_compiled(make, shape, backend="inductor")
    y_eager, y_compiled = eager(x), compiled(x)
    torch.testing.assert_close(y_compiled, y_eager, **TOL[torch.float32])
    y_eager.square().sum().backward()
    y_compiled.square().sum().backward()
    g_eager, g_compiled = trainable_grads(eager), trainable_grads(module)
    assert set(g_eager) == set(g_compiled) and g_eager
    for name in g_eager:
        torch.testing.assert_close(g_compiled[name], g_eager[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", ["lora_linear", "qlora_linear", "small_model"])
def test_fullgraph(case):
    """No graph break anywhere (dynamo only: aot_eager skips inductor's C++ compile)."""
    make, shape = CASES[case]
    eager, _, compiled, x = eager_and_compiled(make, shape, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager(x), **TOL[torch.float32])


@pytest.mark.parametrize("quant_type", ["nf4", "int4"])
def test_linear4bit_is_one_op_in_the_graph(quant_type):
    """Dynamo traces `Linear4bit` with no graph break into one `loralab.linear_4bit` call (its
    fake kernel gives the shapes); forward and backward through aot_eager equal eager."""
    from quant import Linear4bit

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch.manual_seed(0)
    layer = Linear4bit(64, 24, quant_type=quant_type, compute_dtype=torch.float32)
    x = torch.randn(3, 64, requires_grad=True)
    y = torch.compile(layer, backend=record, fullgraph=True)(x)
    y_eager = layer(x)
    torch.testing.assert_close(y, y_eager, **TOL[torch.float32])
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_eager,) = torch.autograd.grad(y_eager.square().sum(), x)
    torch.testing.assert_close(g, g_eager, **TOL[torch.float32])
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.loralab.linear_4bit.default) == 1, targets
