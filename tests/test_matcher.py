"""One module-name rule (PEFT's `check_target_module_exists`) for every place that selects
modules by name: `apply_lora(target_modules=, exclude_modules=)`, `quantize_model` and
`add_adapters(after=)`; and the one dotted-path setter."""
import pytest
import torch
from torch import nn

from lora import LoRAConfig, LoRALinear, add_adapters, apply_lora
from quant import LinearNF4, quantize_model
from quant.module_paths import name_matches, set_submodule

# (patterns, module name, selected?) -- a str is a full-name regex, a list holds names / dotted suffixes.
TABLE = [
    (["q"], "q", True),                          # exact name
    (["q"], "layers.0.attn.q", True),            # suffix after a dot
    (["attn.q"], "layers.0.attn.q", True),       # dotted suffix
    (["q"], "layers.0.attn.qq", False),          # not a suffix at a dot
    (["q"], "layers.0.attn.aq", False),
    (["attn"], "layers.0.attn.q", False),        # a parent's name does not select its children
    (["attn.*"], "layers.0.attn.q", False),      # list entries are names, never regexes
    (["attn.*"], "attn.*", True),                # ... matched literally
    (["0.attn.q"], "layers.10.attn.q", False),   # suffix starts at a dot
    (r".*\.q", "layers.0.attn.q", True),         # str: regex over the whole name
    (r"attn\.q", "layers.0.attn.q", False),      # ... fullmatch, not search
    (r"layers\.[01]\.attn\.(q|v)", "layers.1.attn.v", True),
    (r"layers\.[01]\.attn\.(q|v)", "layers.2.attn.v", False),
    ("q", "q", True),
    ([], "q", False),                            # empty list selects nothing
    (None, "q", False),
    (("q", "v"), "layers.0.attn.v", True),       # any iterable of names
]


@pytest.mark.parametrize("patterns, name, expected", TABLE)
def test_name_matches_table(patterns, name, expected):
    assert name_matches(patterns, name) is expected


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.q(x) + self.v(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.qq = Attn(), nn.Linear(64, 64)

    def forward(self, x):
        return self.qq(self.attn(x))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(3)])


# Patterns that select at least one linear layer of `_model()`, to run through each caller.
CALLER_PATTERNS = [["q"], ["attn.q", "v"], ["0.attn.q"], r".*\.attn\.(q|v)", r"[02]\.qq", ["qq"]]


@pytest.mark.parametrize("patterns", CALLER_PATTERNS)
def test_every_caller_selects_what_name_matches_selects(patterns):
    linear_names = [n for n, m in _model().named_modules() if type(m) is nn.Linear]
    expected = [n for n in linear_names if name_matches(patterns, n)]
    assert expected  # each row selects something, so the comparison below is not vacuous

    model = _model()
    assert sorted(apply_lora(model, LoRAConfig(r=2, target_modules=patterns))) == sorted(expected)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)) == sorted(expected)

    model = quantize_model(_model(), target_modules=patterns, compute_dtype=torch.float32)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LinearNF4)) == sorted(expected)

    assert sorted(add_adapters(_model(), after=patterns, bottleneck=2)) == sorted(expected)


def test_exclude_modules_use_the_same_rule():
    model = _model()
    names = apply_lora(model, LoRAConfig(r=2, target_modules=["q", "v"], exclude_modules=["1.attn.q"]))
    assert "1.attn.q" not in names and "0.attn.q" in names and "1.attn.v" in names
    model = quantize_model(_model(), exclude_modules=r"\d\.attn\..", compute_dtype=torch.float32)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LinearNF4)) == ["0.qq", "1.qq", "2.qq"]


def test_a_list_entry_is_not_a_regex_anywhere():
    """The inconsistency this rule replaced: `after=["attn.*"]` used to be a regex, `target_modules` not."""
    with pytest.raises(ValueError, match="matched no module"):
        apply_lora(_model(), LoRAConfig(target_modules=["attn.*"]))
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        quantize_model(_model(), target_modules=["attn.*"])
    with pytest.raises(ValueError, match=r"after: 'attn\.\*' matched no module"):
        add_adapters(_model(), after=["attn.*"])


def test_set_submodule():
    model = _model()
    new = nn.Linear(64, 64)
    set_submodule(model, "1.attn.q", new)
    assert model[1].attn.q is new
    set_submodule(model, "2", new)  # a direct child of the root
    assert model[2] is new
    with pytest.raises(AttributeError):
        set_submodule(model, "1.nothere.q", new)
    with pytest.raises(ValueError, match="root cannot be replaced"):
        set_submodule(model, "", new)
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        set_submodule(model, "1.attn.q", torch.zeros(1))
