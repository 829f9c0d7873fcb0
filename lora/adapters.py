"""Bottleneck adapter layers (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

`Adapter(x) = x + up(dropout(act(down(x))))`: a small residual MLP inserted after a
sublayer (Houlsby sec. 2.1 puts one after the attention output and one after the
feed-forward output of each block). The up-projection starts at zero, so a fresh adapter
is exactly the identity ("near-identity initialization", Houlsby sec. 2.1).

`add_adapters(model, after=[...])` inserts one after each named sublayer of any
`nn.Module`: the adapter becomes a child called `adapter` of that sublayer and a
forward hook applies it to the sublayer's output (the first element when the output is
a tuple, as Hugging Face attention modules return). The model's own parameter names do
not change, so its state dict still loads. File layout (see `lora.files`):
`adapter_config.json` with `"peft_type": "BOTTLENECK"` (this project's own type; PEFT
has none) and keys `base_model.model.<path>.adapter.down.weight`, `....down.bias`,
`....up.weight`, `....up.bias` in `adapter_model.safetensors`.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from quant.module_paths import name_matches

from .config import check_adapter_name, check_dropout, check_positive_int, compile_regex
from .model_state import BOTTLENECK_CONFIGS, BOTTLENECK_HOOKS, drop_state, get_state, set_state

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
BOTTLENECK_ATTR = BOTTLENECK_CONFIGS  # model attribute {adapter_name: AdapterConfig} (lora/model_state.py)
HOOKS_ATTR = BOTTLENECK_HOOKS  # model attribute {module path: hook handle} (lora/model_state.py)


class Adapter(nn.Module):
    """`x + up(dropout(act(down(x))))` with `up` zero-initialised (identity at start, Houlsby sec. 2.1).

    Args:
        d_model: feature size of x (last dimension).
        bottleneck: hidden size m of the adapter; Houlsby sec. 3.1 sweeps m in {8, 64, 256}.
        activation: one of "gelu", "relu", "silu", "tanh".
        dropout: dropout probability after the activation.

    Shapes: x (..., d_model) -> (..., d_model), in x's dtype.
    """

    def __init__(self, d_model: int, bottleneck: int, activation: str = "gelu", dropout: float = 0.0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(bottleneck, "bottleneck")
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        check_dropout(dropout)
        self.d_model, self.bottleneck, self.activation = d_model, bottleneck, activation
        self.down = nn.Linear(d_model, bottleneck, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(bottleneck, d_model, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"adapter input has {x.shape[-1]} features, expected d_model={self.d_model}")
        h = self.up(self.dropout(self.act(self.down(x.to(self.down.weight.dtype)))))  # (..., d_model)
        return x + h.to(x.dtype)


@dataclass
class AdapterConfig:
    """Where bottleneck adapters go and their size."""

    after: list[str] | str  # sublayers to follow: names / dotted suffixes (list) or one full-name regex (str)
    bottleneck: int = 64  # adapter hidden size: more capacity, more parameters (Houlsby sec. 3.1: 8..256)
    activation: str = "gelu"  # nonlinearity between down and up
    dropout: float = 0.0  # dropout after the activation; regularises small-data runs

    def __post_init__(self):
        self.after = check_after(self.after, "after")
        Adapter(1, self.bottleneck, self.activation, self.dropout)  # validates the rest

    def to_peft_dict(self) -> dict:
        return {"peft_type": "BOTTLENECK", "task_type": None, "base_model_name_or_path": None,
                "inference_mode": True, **asdict(self)}

    @classmethod
    def from_peft_dict(cls, d: dict) -> "AdapterConfig":
        """Read our BOTTLENECK `adapter_config.json`; errors name the JSON key."""
        if not isinstance(d, dict):
            raise TypeError(f"adapter_config.json must hold a JSON object, got {type(d).__name__}")
        if d.get("peft_type") != "BOTTLENECK":
            raise ValueError(f"adapter_config.json: peft_type must be 'BOTTLENECK', got {d.get('peft_type')!r}")
        after = check_after(d.get("after"), "adapter_config.json: after")
        bottleneck, activation, dropout = d.get("bottleneck", 64), d.get("activation", "gelu"), d.get("dropout", 0.0)
        try:
            Adapter(1, bottleneck, activation, dropout)
        except (TypeError, ValueError) as err:
            raise type(err)(f"adapter_config.json: {err}") from None
        return cls(after=after, bottleneck=bottleneck, activation=activation, dropout=dropout)


def check_after(after, name: str) -> list[str] | str:
    """A non-empty list of module names / dotted suffixes, or one regex (which must compile),
    read by the rule of `quant.module_paths.name_matches` (PEFT's `target_modules` rule)."""
    if isinstance(after, (tuple, set)) and all(isinstance(a, str) for a in after):
        after = sorted(after)
    if isinstance(after, str):
        if not after:
            raise ValueError(f"{name} must name at least one module, got ''")
        compile_regex(name, after)
        return after
    if not isinstance(after, list) or not after or not all(isinstance(a, str) and a for a in after):
        raise TypeError(f"{name} must be a non-empty list of module names/patterns or a regex string, got {after!r}")
    return after


def resolve_after(model: nn.Module, after: list[str] | str) -> list[str]:
    """Qualified names of the modules `after` selects; ValueError for any entry that matches nothing."""
    names = [n for n, _ in model.named_modules() if n and not n.endswith(".adapter") and ".adapter." not in n]
    patterns = [after] if isinstance(after, str) else [[entry] for entry in after]  # each entry must match
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if name_matches(pattern, n)]
        if not hits:
            shown = ", ".join(names[:60]) + (" ..." if len(names) > 60 else "")
            shown_pattern = pattern if isinstance(pattern, str) else pattern[0]
            raise ValueError(f"after: {shown_pattern!r} matched no module of {type(model).__name__}; "
                             f"module names: [{shown}]")
        chosen += [h for h in hits if h not in chosen]
    return [n for n in names if n in chosen]  # model order


def output_features(module: nn.Module) -> int:
    """The feature size of a module's output: its `out_features` / `embedding_dim` /
    `normalized_shape`, else that of its last linear-like submodule."""
    for m in [module] + [m for _, m in reversed(list(module.named_modules()))]:
        for attr in ("out_features", "embedding_dim"):
            if isinstance(getattr(m, attr, None), int):
                return getattr(m, attr)
        shape = getattr(m, "normalized_shape", None)
        if isinstance(shape, tuple) and len(shape) == 1:
            return shape[0]
    raise ValueError(f"cannot infer the output size of {type(module).__name__}; pass d_model=")


def _hook(module: nn.Module, inputs, output):
    if isinstance(output, tuple):  # e.g. (hidden, attention weights): adapt the hidden states only
        return (module.adapter(output[0]),) + output[1:]
    return module.adapter(output)


def add_adapters(model: nn.Module, after: list[str] | str | AdapterConfig, bottleneck: int = 64,
                 activation: str = "gelu", dropout: float = 0.0, d_model: int | None = None,
                 adapter_name: str = "default", dtype: torch.dtype | None = None) -> list[str]:
    """Insert an `Adapter` after each selected sublayer of `model` (in place) and freeze the rest.

    Args:
        model: any nn.Module.
        after: module names / dotted suffixes (a list), one full-name regex (a str), or an `AdapterConfig`
            (which then also gives bottleneck, activation and dropout).
        bottleneck, activation, dropout: as `Adapter`.
        d_model: feature size of every selected output; inferred per module when None.
        adapter_name: the name the adapter files use (one set of bottleneck adapters per model).
        dtype: adapter dtype (default float32, float64 for a float64 model).

    Returns:
        The qualified names of the modules that got an adapter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_adapter_name(adapter_name)
    config = after if isinstance(after, AdapterConfig) else AdapterConfig(after, bottleneck, activation, dropout)
    if get_state(model, BOTTLENECK_CONFIGS):
        raise ValueError("model already has bottleneck adapters; remove_adapters(model) first")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    names = resolve_after(model, config.after)
    taken = [n for n in names if "adapter" in dict(model.get_submodule(n).named_children())]
    if taken:
        raise ValueError(f"modules {taken} already have a child called 'adapter'")
    # Build every adapter before touching the model, so a failure (e.g. an output size
    # that cannot be inferred, a bad d_model) leaves the model as it was.
    adapters = {name: _new_adapter(model.get_submodule(name), config, d_model, dtype) for name in names}
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = {}
    for name, adapter in adapters.items():
        module = model.get_submodule(name)
        module.adapter = adapter
        hooks[name] = module.register_forward_hook(_hook)
    set_state(model, BOTTLENECK_HOOKS, hooks)
    set_state(model, BOTTLENECK_CONFIGS, {adapter_name: copy.deepcopy(config)})
    return names


def _new_adapter(module: nn.Module, config: AdapterConfig, d_model: int | None,
                 dtype: torch.dtype | None) -> Adapter:
    """The adapter for one sublayer, on its device, float32 (float64 for a float64 sublayer) unless `dtype`."""
    ref = next(iter(module.parameters()), None)
    dt = dtype or (torch.float64 if ref is not None and ref.dtype == torch.float64 else torch.float32)
    size = d_model if d_model is not None else output_features(module)
    return Adapter(size, config.bottleneck, config.activation, config.dropout, dtype=dt,
                   device=ref.device if ref is not None else None)


def adapter_modules(model: nn.Module) -> dict[str, Adapter]:
    """{path of the adapted sublayer: its Adapter}."""
    return {name: model.get_submodule(name).adapter for name in get_state(model, BOTTLENECK_HOOKS)}


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take every bottleneck adapter out again (hooks and children); the model is as before."""
    for name, handle in get_state(model, BOTTLENECK_HOOKS).items():
        handle.remove()
        del model.get_submodule(name).adapter
    drop_state(model, BOTTLENECK_HOOKS, BOTTLENECK_CONFIGS)
    return model
