"""`LoRAConfig`: one typed dataclass that says where LoRA goes and how big it is.

Field names follow the LoRA paper (Hu et al. 2021); `to_peft_dict` / `from_peft_dict`
translate to the `adapter_config.json` of Hugging Face PEFT (`lora_alpha`, `use_rslora`, ...).
"""
from __future__ import annotations

import copy
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
RESERVED_NAME = "__base__"  # a mixed batch's row name for "no adapter" (PEFT's name, lora/row_batch.py)


def check_adapter_name(adapter_name, name: str = "adapter_name") -> str:
    """An adapter name is one safe path component: `[A-Za-z0-9_-]{1,128}`, other than `"__base__"`.

    Adapter names become folder names (`save_adapter` writes `directory/<adapter_name>`)
    and module-dict keys, so `.`, `/`, `..`, absolute paths and the empty string are refused.
    """
    if not isinstance(adapter_name, str):
        raise TypeError(f"{name} must be a str, got {type(adapter_name).__name__}")
    if not ADAPTER_NAME.fullmatch(adapter_name):
        raise ValueError(f"{name} must be 1-128 characters from [A-Za-z0-9_-] (one safe folder name), "
                         f"got {adapter_name!r}")
    if adapter_name == RESERVED_NAME:
        raise ValueError(f"{name} {RESERVED_NAME!r} is reserved: in a mixed batch it names the rows that run "
                         "the base model alone (PEFT's name), so an adapter of that name could never run")
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
    out["target_parameters"] = check_module_list(label("target_parameters"), values["target_parameters"],
                                                 regex_ok=False)
    out["trainable_token_indices"] = check_token_index_spec(label("trainable_token_indices"),
                                                            values["trainable_token_indices"])
    check_flag(label("lora_bias"), values["lora_bias"])
    if values["lora_bias"] and (values["dora"] or values["init"] != "kaiming"):
        raise ValueError(f"{label('lora_bias')}=True works without DoRA and with the default init only (kaiming; "
                         f"PEFT's init_lora_weights=True), as in PEFT; got dora={values['dora']!r}, "
                         f"init={values['init']!r}")
    out["layers_to_transform"], out["layers_pattern"] = check_layer_selection(values, out, label)
    if values["lora_bias"] and out["target_parameters"]:
        raise ValueError(f"{label('lora_bias')}=True does not apply to {label('target_parameters')} (PEFT refuses it "
                         "for parameter adapters too)")
    if out["target_modules"] is None and not out["target_parameters"]:
        raise ValueError(f"{label('target_modules')} must be given: a list of module names, a regex, or 'all-linear' "
                         f"(or [] / None with {label('target_parameters')})")
    return out


def check_layer_selection(values: dict, out: dict, label) -> tuple:
    """PEFT's `layers_to_transform` (None, a layer index, or a list of them; [] selects every
    layer) and `layers_pattern` (None, or the name(s) of the block list, e.g. "layers" or "h",
    each a regex fragment). Like PEFT: only with a list of `target_modules` (not a regex or
    "all-linear"), and a pattern needs indices. Not with `target_parameters` (PEFT does not
    filter those by layer)."""
    indices, patterns = values["layers_to_transform"], values["layers_pattern"]
    name, pname = label("layers_to_transform"), label("layers_pattern")
    if isinstance(indices, tuple):
        indices = list(indices)
    if indices is not None:
        items = indices if isinstance(indices, list) else [indices]
        bad = [i for i in items if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad or not isinstance(indices, (int, list)):
            raise ValueError(f"{name} must be None, a layer index (int >= 0) or a list of them, got {indices!r}")
    if isinstance(patterns, tuple):
        patterns = list(patterns)
    if patterns is not None:
        items = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
            raise TypeError(f"{pname} must be None, a str or a list of str (the block list's name, e.g. 'layers'), "
                            f"got {patterns!r}")
        for p in items:
            compile_regex(pname, p, used_as=rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.")
    using = indices is not None and indices != []
    if patterns and indices is None:
        raise ValueError(f"{pname}={patterns!r} needs {name} too (the indices of the blocks to adapt), as in PEFT")
    if (using or patterns) and isinstance(out["target_modules"], str):
        raise ValueError(f"{name} / {pname} need {label('target_modules')} as a list of module names (PEFT's rule), "
                         f"got the str {out['target_modules']!r}; list the names, e.g. ['q_proj', 'v_proj']")
    if using and out["target_parameters"]:
        raise ValueError(f"{name} does not apply to {label('target_parameters')} (PEFT adapts those in every "
                         "layer); name the parameters of the layers you want instead")
    return indices, patterns


def check_token_index_spec(name: str, value) -> list[int] | dict[str, list[int]] | None:
    """PEFT's `trainable_token_indices`: None, a list of token ids (rows of the input
    embedding), or {module name: list of token ids}. Ids are checked against the
    embedding's size when the layer is wrapped."""
    if value is None:
        return None
    if isinstance(value, dict):
        out = {}
        for key, ids in value.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"{name} keys must be module names (non-empty str), got {key!r}")
            out[key] = _token_ids(f"{name}[{key!r}]", ids)
        if not out:
            raise ValueError(f"{name} must name at least one module, got an empty dict")
        return out
    return _token_ids(name, value)


def _token_ids(name: str, ids) -> list[int]:
    if isinstance(ids, (tuple, set)):
        ids = sorted(ids) if isinstance(ids, set) else list(ids)
    if not isinstance(ids, list):
        raise TypeError(f"{name} must be a list of token ids (ints) or a dict of such lists, got {type(ids).__name__}")
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad or not ids:
        raise ValueError(f"{name} must be a non-empty list of token ids (ints >= 0), got {bad[:8] or ids}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name} lists a token id twice: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    return list(ids)


# LoRAConfig field -> (key in PEFT's adapter_config.json, default when the key is absent)
PEFT_KEYS = {
    "r": ("r", 8), "alpha": ("lora_alpha", 8), "dropout": ("lora_dropout", 0.0),
    "target_modules": ("target_modules", None), "exclude_modules": ("exclude_modules", None),
    "bias": ("bias", "none"), "rslora": ("use_rslora", False), "init": ("init_lora_weights", True),
    "fan_in_fan_out": ("fan_in_fan_out", False), "rank_pattern": ("rank_pattern", {}),
    "alpha_pattern": ("alpha_pattern", {}), "modules_to_save": ("modules_to_save", None),
    "dora": ("use_dora", False), "target_parameters": ("target_parameters", None),
    "trainable_token_indices": ("trainable_token_indices", None),
    "lora_bias": ("lora_bias", False), "layers_to_transform": ("layers_to_transform", None),
    "layers_pattern": ("layers_pattern", None),
}
PEFT_JSON_NAMES = {**{name: key for name, (key, _) in PEFT_KEYS.items()},
                   "loftq_bits": "loftq_config.loftq_bits", "loftq_iter": "loftq_config.loftq_iter"}
# PEFT features that change what the weights mean; a file using one would load wrongly, so it is refused.
UNSUPPORTED_PEFT_KEYS = ("layer_replication", "use_qalora",
                         "alora_invocation_tokens")


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
    loftq_bits: int = 4  # init="loftq": bits of the base: 4, 3 or 2 (NF4, NF3, NF2; all stored in 4 bits)
    loftq_iter: int = 1  # init="loftq": alternating steps (LoftQ Algorithm 1, T); more = smaller error, slower init
    # "module.path.param" (or a dotted suffix) of raw nn.Parameters to adapt, e.g. MoE experts held as one 3-D tensor
    # (PEFT's target_parameters; lora/param_wrapper.py); with target_modules=[] adapts parameters only
    target_parameters: list[str] | None = None
    # rows of the input embedding trained in full, for new tokens (list), or {embedding name: rows}; a head tied
    # to the embedding follows (PEFT's trainable_token_indices; lora/trainable_tokens.py)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    # a trainable bias on lora_B: update = scaling * (B A x + b); for adapters extracted from a full fine-tune whose
    # biases changed (PEFT's lora_bias); merging adds scaling * b to the base bias
    lora_bias: bool = False
    # adapt only the blocks with these indices (int or list) of the block list, found by PEFT's rule: the first
    # "<name>.<index>." in a module's path, <name> one of layers_pattern (e.g. "layers", "h") or any name if None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None

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
        targets = [] if self.target_modules is None else self.target_modules  # None: PEFT would pick its defaults
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
            "target_parameters": self.target_parameters,
            "trainable_token_indices": copy.deepcopy(self.trainable_token_indices),
            "lora_bias": self.lora_bias, "layers_to_transform": copy.deepcopy(self.layers_to_transform),
            "layers_pattern": copy.deepcopy(self.layers_pattern),
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
        refuse_unknown_peft_options(d, "adapter_config.json")
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

    @classmethod
    def from_peft(cls, config) -> "LoRAConfig":
        """A `LoRAConfig` from PEFT's `LoraConfig` object, or a dict in PEFT's names
        (`lora_alpha`, `lora_dropout`, `use_rslora`, `use_dora`, `init_lora_weights`,
        `target_modules`, `modules_to_save`, `rank_pattern`, ...).

        An option this library does not implement (`layer_replication`, EVA / CorDA inits,
        QALoRA, ...) is refused with a ValueError naming it, never
        ignored; options left at their "off" value (None, False, {}) are fine.
        `init_lora_weights=False` (PEFT's random B, for tests) and `"eva"` (needs data)
        start a new adapter differently from any init here, so they are refused too."""
        return _config_from_peft(cls, config)


# Keys of PEFT's LoraConfig that say nothing about the weights (bookkeeping), and options
# that only act together with another one refused above (their defaults are not "off").
PEFT_METADATA_KEYS = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                      "revision", "inference_mode")
PEFT_DEPENDENT_KEYS = ("megatron_core",  # used only with megatron_config
                       "qalora_group_size")  # used only with use_qalora


def _is_off(value) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def refuse_unknown_peft_options(d: dict, label: str) -> None:
    """Any other PEFT option that is switched on changes what the adapter means (a new
    variant, a new init): refused, naming it, rather than silently dropped."""
    known = {key for key, _ in PEFT_KEYS.values()} | {"loftq_config"} | set(UNSUPPORTED_PEFT_KEYS)
    known |= set(PEFT_METADATA_KEYS) | set(PEFT_DEPENDENT_KEYS)
    unknown = sorted(k for k, v in d.items() if k not in known and not _is_off(v))
    if unknown:
        shown = ", ".join(f"{k}={d[k]!r}" for k in unknown)
        raise ValueError(f"{label}: PEFT option(s) {shown} are not supported by this library")


def _config_from_peft(cls, config) -> LoRAConfig:
    """LoRAConfig.from_peft: PEFT's LoraConfig (anything with a `to_dict()` whose peft_type
    is LORA) or a dict of PEFT's names, read by the same rules as adapter_config.json."""
    if isinstance(config, cls):
        raise TypeError("config is already a LoRAConfig; from_peft takes PEFT's LoraConfig or a dict of its names")
    if isinstance(config, dict):
        d = dict(config)
    elif callable(getattr(config, "to_dict", None)) and hasattr(config, "peft_type"):
        d = config.to_dict()
    else:
        raise TypeError(f"config must be a peft.LoraConfig or a dict of its fields, got {type(config).__name__}")
    if str(getattr(d.get("peft_type"), "value", d.get("peft_type", "LORA"))) != "LORA":
        raise ValueError(f"config: peft_type must be LORA (this converts LoRA configs), got {d.get('peft_type')!r}")
    d["peft_type"] = "LORA"
    for key in ("target_modules", "exclude_modules", "modules_to_save", "target_parameters"):  # PEFT keeps sets
        if isinstance(d.get(key), (set, frozenset)):
            d[key] = sorted(d[key])
    init = d.get("init_lora_weights", True)
    if init is False or init == "eva":
        raise ValueError(f"config: init_lora_weights={init!r} is not supported for a new adapter "
                         "(False is PEFT's random B for tests, 'eva' needs data); use True, 'gaussian', "
                         "'pissa', 'pissa_niter_K', 'olora' or 'loftq'")
    try:
        return cls.from_peft_dict(d)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("adapter_config.json:", "config:", 1)) from None


def as_lora_config(config, name: str = "config") -> LoRAConfig:
    """`config` itself when it is a LoRAConfig; otherwise a TypeError that tells a PEFT
    user what to write instead (for `apply_lora(model, config)`)."""
    if isinstance(config, LoRAConfig):
        return config
    kind = type(config)
    if kind.__name__ == "LoraConfig" and kind.__module__.startswith("peft"):
        raise TypeError(f"{name} is PEFT's LoraConfig; this library takes its own LoRAConfig: convert it with "
                        f"LoRAConfig.from_peft({name}) (options it does not support are refused by name). "
                        "Note that apply_lora changes the model in place and returns the names of the wrapped "
                        "layers, not a model: write `apply_lora(model, LoRAConfig.from_peft(cfg))` and keep using "
                        "`model`, not `model = apply_lora(model, cfg)` as with PEFT's get_peft_model")
    if isinstance(config, dict):
        raise TypeError(f"{name} must be a LoRAConfig, got a dict: LoRAConfig(**d) takes this library's field "
                        "names, LoRAConfig.from_peft(d) takes PEFT's (lora_alpha, lora_dropout, ...)")
    raise TypeError(f"{name} must be a LoRAConfig, got {kind.__name__}")
