"""`LoRAConfig`: one typed dataclass that says where LoRA goes and how big it is.

Field names follow the LoRA paper (Hu et al. 2021); `to_peft_dict` / `from_peft_dict`
translate to the `adapter_config.json` of Hugging Face PEFT (`lora_alpha`, `use_rslora`, ...).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian")
ALL_LINEAR = "all-linear"


ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")  # one safe path component: names become folder names


def check_adapter_name(adapter_name, name: str = "adapter_name") -> str:
    """An adapter name is one safe path component: `[A-Za-z0-9_-]{1,128}`.

    Adapter names become folder names (`save_adapter` writes `directory/<adapter_name>`)
    and module-dict keys, so `.`, `/`, `..`, absolute paths and the empty string are refused.
    """
    if not isinstance(adapter_name, str):
        raise TypeError(f"{name} must be a str, got {type(adapter_name).__name__}")
    if not ADAPTER_NAME.fullmatch(adapter_name):
        raise ValueError(f"{name} must be 1-128 characters from [A-Za-z0-9_-] (one safe folder name), "
                         f"got {adapter_name!r}")
    return adapter_name


def check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    return r


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return alpha


def check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


def check_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def scaling_for(r: int, alpha: float, rslora: bool) -> float:
    """`alpha / r` (LoRA sec. 4.1) or `alpha / sqrt(r)` (rsLoRA, Kalajdzievski 2023, "rank-stabilized" scaling)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def pattern_key(patterns: dict, module_name: str) -> str | None:
    """The first key of `patterns` whose regex matches the end of `module_name` (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


@dataclass
class LoRAConfig:
    """Where LoRA adapters go and their size.

    Targets: a list of names matches a module whose qualified name equals an entry or
    ends with `"." + entry`; a single string is a regex that must match the whole
    qualified name; `"all-linear"` means every linear-like layer except the output head.
    """

    r: int = 8  # rank of B @ A: more capacity, more memory (LoRA sec. 7.2: r=1..8 already suffices)
    alpha: float = 8  # scaling = alpha / r; keeps the update size steady when r changes (LoRA sec. 4.1)
    dropout: float = 0.0  # dropout on the LoRA input only; regularises small-data runs (QLoRA uses 0.05-0.1)
    target_modules: list[str] | str | None = None  # names / suffixes, a regex, or "all-linear"
    exclude_modules: list[str] | str | None = None  # same matching rule; wins over target_modules
    bias: str = "none"  # "none" | "all" | "lora_only": which biases train too (more params, can't disable cleanly)
    rslora: bool = False  # alpha / sqrt(r) instead of alpha / r: stabler at large r (rsLoRA)
    init: str = "kaiming"  # "kaiming" (A kaiming-uniform, a=sqrt 5) or "gaussian" (A normal with std 1/r); B is zero
    fan_in_fan_out: bool = False  # True for GPT-2 Conv1D weights stored (in, out); set automatically for Conv1D
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex -> r for matching modules
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex -> alpha for matching modules
    modules_to_save: list[str] | None = None  # modules trained in full and saved with the adapter (e.g. a head)
    dora: bool = False  # DoRA (Liu et al. 2024): learn row magnitudes too; closer to full fine-tuning, slower step

    def __post_init__(self):
        check_rank(self.r)
        check_alpha(self.alpha)
        self.dropout = check_dropout(self.dropout)
        check_choice("bias", self.bias, BIAS_MODES)
        check_choice("init", self.init, INIT_MODES)
        for key, value in self.rank_pattern.items():
            try:
                check_rank(value)
            except ValueError as err:
                raise ValueError(f"rank_pattern[{key!r}]: {err}") from None
        for key, value in self.alpha_pattern.items():
            try:
                check_alpha(value)
            except ValueError as err:
                raise ValueError(f"alpha_pattern[{key!r}]: {err}") from None
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise TypeError(f"{name} must be a list of names, a regex string or None, got {type(value).__name__}")
        if not isinstance(self.dora, bool):
            raise TypeError(f"dora must be a bool, got {type(self.dora).__name__}")
        if self.target_modules is None:
            raise ValueError("target_modules must be given: a list of module names, a regex, or 'all-linear'")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """(r, alpha) for one module, after `rank_pattern` / `alpha_pattern`."""
        key = pattern_key(self.rank_pattern, module_name)
        r = self.rank_pattern[key] if key is not None else self.r
        key = pattern_key(self.alpha_pattern, module_name)
        alpha = self.alpha_pattern[key] if key is not None else self.alpha
        return r, alpha

    def to_peft_dict(self) -> dict:
        """The fields of PEFT's `adapter_config.json` (LoRA) that this config defines."""
        targets = self.target_modules
        return {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": targets, "exclude_modules": self.exclude_modules,
            "bias": self.bias, "use_rslora": self.rslora,
            "init_lora_weights": True if self.init == "kaiming" else "gaussian",
            "fan_in_fan_out": self.fan_in_fan_out,
            "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": self.modules_to_save, "use_dora": bool(self.dora), "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, d: dict) -> "LoRAConfig":
        """Read PEFT's `adapter_config.json` (LoRA and DoRA; other variants are refused)."""
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json: peft_type must be 'LORA', got {d.get('peft_type')!r}")
        for unsupported in ("layers_to_transform", "layer_replication", "lora_bias"):
            if d.get(unsupported):
                raise ValueError(f"adapter_config.json: {unsupported}={d[unsupported]!r} is not supported")
        init = d.get("init_lora_weights", True)
        return cls(
            r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
            target_modules=d.get("target_modules"), exclude_modules=d.get("exclude_modules"),
            bias=d.get("bias", "none"), rslora=bool(d.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "kaiming",
            fan_in_fan_out=bool(d.get("fan_in_fan_out", False)),
            rank_pattern=dict(d.get("rank_pattern") or {}), alpha_pattern=dict(d.get("alpha_pattern") or {}),
            modules_to_save=d.get("modules_to_save"), dora=bool(d.get("use_dora", False)),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
