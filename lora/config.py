"""`LoRAConfig`: one typed dataclass that says where LoRA goes and how big it is.

Field names follow the LoRA paper (Hu et al. 2021); `to_peft_dict` / `from_peft_dict`
translate to the `adapter_config.json` of Hugging Face PEFT (`lora_alpha`, `use_rslora`, ...).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from .init import (
    PISSA_NITER,
    REWRITING_INITS,
    check_loftq_bits,
    check_loftq_bits_supported,
    check_loftq_iter,
    init_kind,
)

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


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_rank(r, name: str = "r") -> int:
    return check_positive_int(r, name)


def check_alpha(alpha, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {alpha!r}")
    return alpha


def check_dropout(dropout, name: str = "dropout") -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
        raise ValueError(f"{name} must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


def check_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_init(init, name: str = "init") -> str:
    """"kaiming" | "gaussian" (B = 0), or a scheme that also rewrites the base (lora/init.py):
    "pissa", "pissa_niter_K" (randomized SVD, K >= 0 power iterations), "olora", "loftq"."""
    if isinstance(init, str) and (init in INIT_MODES + REWRITING_INITS or PISSA_NITER.fullmatch(init)):
        return init
    raise ValueError(f"{name} must be one of {INIT_MODES + REWRITING_INITS} or 'pissa_niter_K' (K an int >= 0), "
                     f"got {init!r}")


def rewrites_base(init: str) -> bool:
    """Whether `init` changes the frozen base weight (PiSSA, OLoRA, LoftQ)."""
    return init_kind(init) in REWRITING_INITS


def check_flag(name: str, value) -> bool:
    """A real bool: `bool("false")` is True, so a string must not pass as a flag."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (true/false), got {type(value).__name__} {value!r}")
    return value


def compile_regex(name: str, pattern: str, used_as: str | None = None) -> re.Pattern:
    """`re.compile(used_as or pattern)`, a bad `pattern` reported as a ValueError naming the field."""
    try:
        return re.compile(pattern if used_as is None else used_as)
    except (re.error, RecursionError, OverflowError, ValueError) as err:
        raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({err})") from None


def check_module_list(name: str, value, regex_ok: bool = True) -> list[str] | str | None:
    """None, a list of module names / suffixes (sets and tuples are sorted), or (when
    `regex_ok`) one regex string, which is compiled here so a bad one fails up front."""
    if isinstance(value, (set, tuple)):
        value = list(value)
        if all(isinstance(v, str) for v in value):
            value = sorted(value)
    if value is None:
        return None
    if isinstance(value, str) and regex_ok:
        compile_regex(name, value)
        return value
    if not isinstance(value, list):
        raise TypeError(f"{name} must be a list of module names, a regex string or None, got {type(value).__name__}")
    for i, entry in enumerate(value):
        if not isinstance(entry, str):
            raise TypeError(f"{name}[{i}] must be a module name (str), got {type(entry).__name__} {entry!r}")
    return value


def check_patterns(name: str, patterns, check_value, value_name: str) -> dict:
    """{regex: value} with str keys that compile (in `pattern_key`'s form) and checked values."""
    if not isinstance(patterns, dict):
        raise TypeError(f"{name} must be a dict {{module regex: value}}, got {type(patterns).__name__}")
    for key, value in patterns.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be regex strings, got {type(key).__name__} {key!r}")
        compile_regex(f"{name}[{key!r}]", key, used_as=rf"(.*\.)?({key})$")
        check_value(value, f"{name}[{key!r}]: {value_name}")
    return dict(patterns)


def scaling_for(r: int, alpha: float, rslora: bool) -> float:
    """`alpha / r` (LoRA sec. 4.1) or `alpha / sqrt(r)` (rsLoRA, Kalajdzievski 2023, "rank-stabilized" scaling)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def pattern_key(patterns: dict, module_name: str) -> str | None:
    """The first key of `patterns` whose regex matches the end of `module_name` (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def check_fields(values: dict, label) -> dict:
    """The checked (and normalised) values of LoRAConfig's fields; `label(field)` is the
    name an error uses (the field itself, or the JSON key of adapter_config.json)."""
    out = dict(values)
    out["r"] = check_rank(values["r"], label("r"))
    out["alpha"] = check_alpha(values["alpha"], label("alpha"))
    out["dropout"] = check_dropout(values["dropout"], label("dropout"))
    check_choice(label("bias"), values["bias"], BIAS_MODES)
    check_init(values["init"], label("init"))
    check_loftq_bits(values["loftq_bits"], label("loftq_bits"))
    check_loftq_iter(values["loftq_iter"], label("loftq_iter"))
    if values["init"] == "loftq":
        check_loftq_bits_supported(values["loftq_bits"], label("loftq_bits"))
    if rewrites_base(values["init"]) and values["dora"] is True:
        raise ValueError(f"{label('init')}={values['init']!r} with {label('dora')}=True is not supported: DoRA's "
                         "magnitude would be taken from the rewritten base, and the adapter could not be "
                         "converted to a plain LoRA")
    for flag in ("rslora", "fan_in_fan_out", "dora"):
        check_flag(label(flag), values[flag])
    out["rank_pattern"] = check_patterns(label("rank_pattern"), values["rank_pattern"], check_rank, "r")
    out["alpha_pattern"] = check_patterns(label("alpha_pattern"), values["alpha_pattern"], check_alpha, "alpha")
    for name in ("target_modules", "exclude_modules", "modules_to_save"):
        out[name] = check_module_list(label(name), values[name])
    if out["target_modules"] is None:
        raise ValueError(f"{label('target_modules')} must be given: a list of module names, a regex, or 'all-linear'")
    return out


# LoRAConfig field -> (key in PEFT's adapter_config.json, default when the key is absent)
PEFT_KEYS = {
    "r": ("r", 8), "alpha": ("lora_alpha", 8), "dropout": ("lora_dropout", 0.0),
    "target_modules": ("target_modules", None), "exclude_modules": ("exclude_modules", None),
    "bias": ("bias", "none"), "rslora": ("use_rslora", False), "init": ("init_lora_weights", True),
    "fan_in_fan_out": ("fan_in_fan_out", False), "rank_pattern": ("rank_pattern", {}),
    "alpha_pattern": ("alpha_pattern", {}), "modules_to_save": ("modules_to_save", None),
    "dora": ("use_dora", False),
}
PEFT_JSON_NAMES = {**{name: key for name, (key, _) in PEFT_KEYS.items()},
                   "loftq_bits": "loftq_config.loftq_bits", "loftq_iter": "loftq_config.loftq_iter"}
# PEFT features that change what the weights mean; a file using one would load wrongly, so it is refused.
UNSUPPORTED_PEFT_KEYS = ("layers_to_transform", "layer_replication", "lora_bias", "target_parameters",
                         "trainable_token_indices", "use_qalora", "alora_invocation_tokens")


def _init_from_peft(init) -> str:
    """PEFT's `init_lora_weights`: True / False / "eva" (the init only chose the starting A;
    the file holds the trained one), "gaussian", or a scheme that rewrote the base ("pissa",
    "pissa_niter_K", "olora", "loftq"; kept, so that `load_adapter` can refuse to put such
    an adapter on an original base). Others (CorDA, ...) are refused."""
    if isinstance(init, bool) or init == "eva":
        return "kaiming"
    if isinstance(init, str):
        try:
            return check_init(init)
        except ValueError:
            raise ValueError(f"adapter_config.json: init_lora_weights must be true, false, 'gaussian' or 'eva' "
                             f"(or 'pissa', 'pissa_niter_K', 'olora', 'loftq'), got {init!r}") from None
    raise TypeError(f"adapter_config.json: init_lora_weights must be a bool or 'gaussian', "
                    f"got {type(init).__name__} {init!r}")


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
    init: str = "kaiming"  # "kaiming"/"gaussian" (B = 0); "pissa", "pissa_niter_K", "olora", "loftq" rewrite the base (lora/init.py)
    fan_in_fan_out: bool = False  # True for GPT-2 Conv1D weights stored (in, out); set automatically for Conv1D
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex -> r for matching modules
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex -> alpha for matching modules
    modules_to_save: list[str] | None = None  # modules trained in full and saved with the adapter (e.g. a head)
    dora: bool = False  # DoRA (Liu et al. 2024): learn row magnitudes too; closer to full fine-tuning, slower step
    loftq_bits: int = 4  # init="loftq": bits of the base (4 = NF4; 2..8 valid for LoftQ, only 4 stored here)
    loftq_iter: int = 1  # init="loftq": alternating steps (LoftQ Algorithm 1, T); more = smaller error, slower init

    def __post_init__(self):
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in check_fields(values, lambda name: name).items():
            setattr(self, key, value)

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
            "init_lora_weights": True if self.init == "kaiming" else self.init,
            "loftq_config": {"loftq_bits": self.loftq_bits, "loftq_iter": self.loftq_iter}
            if self.init == "loftq" else {},
            "fan_in_fan_out": self.fan_in_fan_out,
            "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": self.modules_to_save, "use_dora": bool(self.dora), "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, d: dict) -> "LoRAConfig":
        """Read PEFT's `adapter_config.json` (LoRA and DoRA; other variants are refused).

        Every field is type-checked here, and errors name the JSON key (`use_rslora`, not `rslora`)."""
        if not isinstance(d, dict):
            raise TypeError(f"adapter_config.json must hold a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json: peft_type must be 'LORA', got {d.get('peft_type')!r}")
        for unsupported in UNSUPPORTED_PEFT_KEYS:
            value = d.get(unsupported)
            if not (value is None or value is False or value == [] or value == {}):  # 0 is layer 0: refused
                raise ValueError(f"adapter_config.json: {unsupported}={value!r} is not supported")
        values = {name: d.get(key, default) for name, (key, default) in PEFT_KEYS.items()}
        for name in ("rank_pattern", "alpha_pattern"):  # PEFT writes {}, older files null
            values[name] = {} if values[name] is None else values[name]
        values["init"] = _init_from_peft(d.get("init_lora_weights", True))
        loftq = d.get("loftq_config") or {}
        if not isinstance(loftq, dict):
            raise TypeError(f"adapter_config.json: loftq_config must be an object, got {type(loftq).__name__}")
        values["loftq_bits"] = loftq.get("loftq_bits", 4)
        values["loftq_iter"] = loftq.get("loftq_iter", 1)
        return cls(**check_fields(values, lambda name: f"adapter_config.json: {PEFT_JSON_NAMES.get(name, name)}"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
