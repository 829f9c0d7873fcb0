"""How much memory does fine-tuning take? An estimator, and a way to check it.

Training memory has four parts (LoRA sec. 4.2 and QLoRA sec. 2 make the same split):

- weights: every parameter and buffer of the model, in its storage format
  (bf16/fp32, or NF4 at ~4.127 bits per parameter for QLoRA's frozen base);
- gradients: one tensor per *trainable* parameter, same dtype as the parameter;
- optimizer states: AdamW keeps two (`exp_avg`, `exp_avg_sq`) per trainable
  parameter plus a one-element `step` tensor per parameter tensor; plain SGD none;
- activations: the tensors autograd saves in the forward pass for the backward pass.

Full fine-tuning pays gradients and optimizer states for every parameter; LoRA only
for the adapters (about 0.1-1% of them), which is the whole point of PEFT. QLoRA also
shrinks the frozen weights 4x. Activations hardly change between the three methods.

`estimate(...)` works from a model (it counts its real tensors) or from a `ModelSpec`
(a config, for models too big for this machine: Llama-3-8B and 70B ship with it). This
module only computes: measuring a live process is `lora.memory_probe`
(`saved_activation_bytes` records what autograd really saves, with
`torch.autograd.graph.saved_tensors_hooks`; the tests compare the two), and the command
line is `lora.memory_cli`: `python -m lora.memory --config llama-3-8b --method qlora --r 16`
(or `python -m lora.memory_cli ...`). Their names stay importable from here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .config import check_flag, check_positive_int

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "sgd")
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _dtype(x, name: str = "weight_dtype") -> torch.dtype:
    """A floating torch dtype, or its name in `_DTYPES`; errors name the argument `name`."""
    if isinstance(x, torch.dtype) and x.is_floating_point:
        return x
    if isinstance(x, str) and x in _DTYPES:
        return _DTYPES[x]
    raise ValueError(f"{name} must be a torch dtype (floating point) or one of {sorted(_DTYPES)}, got {x!r}")


def _check_quant_args(blocksize, double_quant) -> None:
    from quant import VALID_BLOCKSIZES

    if isinstance(blocksize, bool) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES} (bitsandbytes' block sizes), got {blocksize!r}")
    check_flag("double_quant", double_quant)


def _check_dropout(dropout) -> float:
    ok = isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0
    if not ok:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    return float(dropout)


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a Llama-architecture model: all the estimator needs to know."""

    hidden_size: int  # d, the residual-stream width
    num_layers: int  # transformer blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention)
    intermediate_size: int  # SwiGLU hidden width
    vocab_size: int  # token embeddings (and output head)
    tie_word_embeddings: bool = False  # output head shares the embedding matrix
    name: str = "custom"

    def __post_init__(self):
        for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "intermediate_size", "vocab_size"):
            check_positive_int(getattr(self, f), f)
        if not isinstance(self.tie_word_embeddings, bool):
            raise TypeError(f"tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must be divisible by num_heads, and num_heads by "
                             f"num_kv_heads; got {self.hidden_size}, {self.num_heads}, "
                             f"{self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear layer of one block."""
        d, f, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        return {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
                "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}

    def parameter_numels(self) -> list[int]:
        """Element count of every parameter tensor (the tied head counted once)."""
        d, V = self.hidden_size, self.vocab_size
        block = [o * i for o, i in self.linear_shapes().values()] + [d, d]  # + two RMSNorms
        head = [] if self.tie_word_embeddings else [V * d]
        return [V * d] + block * self.num_layers + [d] + head  # + final norm

    def num_parameters(self) -> int:
        return sum(self.parameter_numels())

    @classmethod
    def from_config(cls, cfg) -> "ModelSpec":
        """Read a config object by the attribute names in `CONFIG_NAMES`."""
        def get(field_name):
            names = CONFIG_NAMES[field_name]
            for n in names:
                if hasattr(cfg, n):
                    return getattr(cfg, n)
            raise ValueError(f"model_or_config: a {type(cfg).__name__} config has none of the "
                             f"attributes {names}; pass an nn.Module, a ModelSpec, a preset name "
                             f"({sorted(PRESETS)}) or a Llama-style config")
        values = {f: get(f) for f in CONFIG_NAMES}
        values["tie_word_embeddings"] = bool(values["tie_word_embeddings"])
        return cls(**values, name=type(cfg).__name__)

# ModelSpec field -> config attribute names that give it, tried in order: Hugging Face's
# (`LlamaConfig`), then those of the in-repo Llama (`examples/llama.py`'s `LlamaConfig`).
CONFIG_NAMES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "dim"),
    "num_layers": ("num_hidden_layers", "n_layers"),
    "num_heads": ("num_attention_heads", "n_heads"),
    "num_kv_heads": ("num_key_value_heads", "n_kv_heads", "num_attention_heads"),  # no GQA: as many as heads
    "intermediate_size": ("intermediate_size", "ffn_dim"),
    "vocab_size": ("vocab_size",),
    "tie_word_embeddings": ("tie_word_embeddings", "tie_embeddings"),
}



# Published configs (the models' config.json files).
PRESETS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(576, 30, 9, 3, 1536, 49152, True, "SmolLM2-135M"),
    "llama-3.2-1b": ModelSpec(2048, 16, 32, 8, 8192, 128256, True, "Llama-3.2-1B"),
    "llama-3-8b": ModelSpec(4096, 32, 32, 8, 14336, 128256, False, "Llama-3-8B"),
    "llama-3-70b": ModelSpec(8192, 80, 64, 8, 28672, 128256, False, "Llama-3-70B"),
}


@dataclass
class MemoryEstimate:
    """Bytes of each part of training memory."""

    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    trainable_params: int
    total_params: int
    details: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.activations

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("gradients", self.gradients),
                ("optimizer states", self.optimizer_states), ("activations", self.activations),
                ("total", self.total)]


def nf4_storage_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes that one NF4 weight of `numel` elements holds (bitsandbytes layout).

    Packed codes: 4 bits each. Absmax: one fp32 per block (32 / blocksize bits per
    parameter: 0.5 at blocksize 64), or with double quantization one uint8 per block
    plus one fp32 per 256 blocks and the fp32 mean (QLoRA sec. 3: 8/64 + 32/(64*256)
    = 0.127 bits). The code books are shared by all weights: `code_book_bytes`, once.
    """
    check_positive_int(numel, "numel")
    _check_quant_args(blocksize, double_quant)
    nblocks = math.ceil(numel / blocksize)
    n = (numel + 1) // 2
    if double_quant:
        return n + nblocks + 4 * math.ceil(nblocks / 256) + 4
    return n + 4 * nblocks


def code_book_bytes(double_quant: bool = True) -> int:
    """The float32 code books a quantized model holds once, whatever its size: the 16 NF4
    levels, and with double quantization the 256-entry dynamic 8-bit map."""
    check_flag("double_quant", double_quant)
    return 16 * 4 + (256 * 4 if double_quant else 0)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_args(method, optimizer, r, batch_size, seq_len):
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    for name, v in (("r", r), ("batch_size", batch_size), ("seq_len", seq_len)):
        check_positive_int(v, name)


def _spec_targets(spec: "ModelSpec", target_modules) -> tuple[str, ...]:
    """The Llama linear names `target_modules` selects, by LoRAConfig's rule: a str is one regex
    matched against the whole name (here the bare name or its Hugging Face path in block i),
    "all-linear" is all of them; a list entry matches the name or its last path component."""
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            return LLAMA_LINEARS
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: {err}") from None
        per_block = {tuple(n for n in LLAMA_LINEARS if pattern.fullmatch(n) or pattern.fullmatch(_hf_path(n, i)))
                     for i in range(spec.num_layers)}
        if len(per_block) > 1:
            raise ValueError(f"target_modules={target_modules!r} selects different layers in different blocks; "
                             "the estimator assumes the same targets in every block")
        targets = per_block.pop()
    elif isinstance(target_modules, (list, tuple)):
        bad = [n for n in target_modules if not isinstance(n, str)]
        if bad:
            raise TypeError(f"target_modules must hold str names, got {bad!r}")
        unknown = sorted({n for n in target_modules if n.split(".")[-1] not in LLAMA_LINEARS})
        if unknown:
            raise ValueError(f"target_modules: {unknown} are not Llama linear layers; "
                             f"allowed: {LLAMA_LINEARS} or 'all-linear'")
        targets = tuple(n for n in LLAMA_LINEARS if n in {t.split(".")[-1] for t in target_modules})
    else:
        raise TypeError(f"target_modules must be a list of names, a regex str or 'all-linear', "
                        f"got {type(target_modules).__name__}")
    if not targets:
        raise ValueError(f"target_modules={target_modules!r} matches no Llama linear layer {LLAMA_LINEARS}")
    return targets


def _hf_path(name: str, i: int) -> str:
    """Hugging Face's qualified name of linear `name` in block `i` of a Llama."""
    return f"model.layers.{i}.{'mlp' if name in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{name}"


def _optimizer_bytes(optimizer: str, trainable: list[tuple[int, torch.dtype]]) -> int:
    """AdamW: exp_avg and exp_avg_sq in the parameter's dtype, plus a float32 `step`
    tensor per parameter tensor (torch.optim.AdamW's state layout). SGD: nothing."""
    if optimizer == "sgd":
        return 0
    return sum(2 * n * _size(dt) + 4 for n, dt in trainable)


def activation_bytes(spec: ModelSpec, method: str, batch_size: int, seq_len: int,
                     act_dtype: torch.dtype = torch.float32, r: int = 8,
                     targets: tuple[str, ...] = LLAMA_LINEARS, dropout: float = 0.0,
                     grad_checkpointing: bool = False) -> int:
    """Bytes autograd saves for one forward pass of a pre-norm Llama (sdpa attention).

    Counted per token, tensor by tensor, as `examples/llama.py` (and Hugging Face's
    Llama, up to small differences in RMSNorm) saves them:

    - RMSNorm in fp32: its input and `rsqrt(mean(x^2))`, plus the normalized `x`
      when the norm weight trains (full fine-tuning only);
    - each linear layer: its input when its weight trains (full) or it has an adapter
      (`lora_A` needs it), and the r-wide `lora_A` output (`lora_B` needs it);
      LoRA dropout adds its output and a one-byte mask per target;
    - attention (scaled_dot_product_attention with grouped-query heads, no T x T
      matrix): q and the output (d each), k and v (num_kv_heads * head_dim each, not
      repeated per query head) and a log-sum-exp per head; o_proj's input is a view of
      the attention output, so it costs nothing more;
    - SwiGLU: gate and up outputs and silu(gate) (3 x intermediate); the product is
      down_proj's input, counted with the linear layers;
    - outside the blocks: the RoPE tables gathered at each position, the final norm,
      the log-softmax of the logits kept by cross-entropy, and the int64 labels.

    With `grad_checkpointing` (`torch.utils.checkpoint`, non-reentrant), each block
    keeps only its input, and one block's activations live again during its
    recomputation in backward: the peak is `num_layers * a * d + block + outside`
    per token (tests/test_memory.py measures each piece).
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    _check_args(method, "adamw", r, batch_size, seq_len)
    act_dtype = _dtype(act_dtype, "act_dtype")
    if isinstance(targets, str) or not all(isinstance(n, str) and n in LLAMA_LINEARS for n in targets):
        raise ValueError(f"targets must be a tuple of names from {LLAMA_LINEARS}, got {targets!r}")
    dropout = _check_dropout(dropout)
    check_flag("grad_checkpointing", grad_checkpointing)
    a, d, f, nh = _size(act_dtype), spec.hidden_size, spec.intermediate_size, spec.num_heads
    kv = spec.num_kv_heads * spec.head_dim
    full = method == "full"
    shapes = spec.linear_shapes()
    t = set(LLAMA_LINEARS) if full else set(targets)
    drop = 0.0 if full or dropout == 0 else 1.0

    def linear_in(names, input_saved_already: bool = False) -> int:
        """Input of linears sharing one input tensor, + LoRA extras (lora_A output, dropout)."""
        hit = [n for n in names if n in t]
        if not hit:
            return 0
        per = 0 if full else sum(r * a + drop * (a + 1) * shapes[n][1] for n in hit)
        return (0 if input_saved_already else a * shapes[hit[0]][1]) + int(per)

    def norm(input_requires_grad: bool) -> int:
        return (4 * d + 4 if input_requires_grad or full else 0) + (4 * d if full else 0)

    def block(input_requires_grad: bool) -> int:
        # With LoRA the first block's input (the frozen embedding) needs no gradient.
        attn = 2 * a * d + 2 * a * kv + 4 * nh  # q, output; k, v (not repeated); log-sum-exp
        mlp = 3 * a * f  # gate output (for silu), silu(gate) and up output (for the product)
        return (norm(input_requires_grad) + norm(True) + linear_in(("q_proj", "k_proj", "v_proj")) + linear_in(("o_proj",), input_saved_already=True)
                + linear_in(("gate_proj", "up_proj")) + linear_in(("down_proj",)) + attn + mlp)

    per_token_layers = block(False) + (spec.num_layers - 1) * block(True)
    if grad_checkpointing:
        # Held through the step: every block's input (a * d each). Live during one block's
        # backward: that block's recomputed activations. Its first RMSNorm saves its fp32
        # input, which in fp32 *is* the held block input (upcast is a no-op): count it once.
        shared_input = 4 * d if act_dtype == torch.float32 else 0
        per_token_layers = spec.num_layers * a * d + block(True) - shared_input
    final_norm = (4 * d + 4) + (4 * d + a * d if full else 0)
    outside = 4 * spec.head_dim + final_norm + a * spec.vocab_size + 8 + (8 if full else 0)
    return batch_size * seq_len * (per_token_layers + outside)


def mixed_activation_bytes(spec: ModelSpec, batch_size: int, seq_len: int) -> int:
    """Bytes autograd saves in one step of full fine-tuning under
    `torch.autocast(dtype=torch.bfloat16)` with fp32 weights (mixed precision,
    Micikevicius et al. 2018), counted as `examples/llama.py` saves them:

    - the residual stream stays fp32 (the embedding is fp32, and fp32 + bf16 = fp32),
      so both RMSNorms of a block save fp32: input, rsqrt, normalized x (4d + 4 + 4d);
    - autocast casts a linear's input to bf16 once *per linear* (only leaf tensors are
      cached), so q/k/v save three bf16 copies of the same input and gate/up two;
      o_proj's input is the bf16 attention output, down_proj's the bf16 SwiGLU product;
    - attention: bf16 q (d) and output (d), k and v (kv each), fp32 log-sum-exp per head;
    - SwiGLU in bf16: gate and up outputs and silu(gate) (3f) plus the product (f);
    - outside the blocks: the int64 ids (embedding backward), the fp32 RoPE tables,
      the final norm (fp32), lm_head's bf16 input and the fp32 log-softmax of the
      logits (cross_entropy runs in fp32 under autocast);
    - per step, not per token: autocast's weight-cast cache. Each weight (a leaf that
      requires grad) is cast to bf16 once per autocast region and that copy is saved
      for backward (matmuls need W for the input gradient): 2 bytes per linear weight
      and lm_head (the tied embedding too). The cache is freed when the region exits.
    """
    d, f, nh, V = spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.vocab_size
    kv = spec.num_kv_heads * spec.head_dim
    norm = 4 * d + 4 + 4 * d  # fp32 input, rsqrt(mean x^2), normalized x (weight trains)
    attn = 3 * 2 * d + 2 * d + 2 * 2 * kv + 4 * nh + 2 * d  # q/k/v input casts, q, k, v, lse, output
    mlp = 2 * 2 * d + 4 * 2 * f  # gate/up input casts; gate, up, silu(gate), product
    block = 2 * norm + attn + mlp
    outside = 8 + 4 * spec.head_dim + norm + 2 * d + 4 * V
    linears = sum(o * i for o, i in spec.linear_shapes().values())
    weight_copies = 2 * (spec.num_layers * linears + V * d)  # bf16 casts of every linear and lm_head
    return batch_size * seq_len * (spec.num_layers * block + outside) + weight_copies


def _estimate_from_spec(spec: ModelSpec, method, r, targets, weight_dtype, adapter_dtype,
                        optimizer, blocksize, double_quant):
    wsize, asize = _size(weight_dtype), _size(adapter_dtype)
    total = spec.num_parameters()
    if method == "full":
        trainable = [(n, weight_dtype) for n in spec.parameter_numels()]
        return (total * wsize, total * wsize, _optimizer_bytes(optimizer, trainable), total,
                total, {})
    shapes = {n: s for n, s in spec.linear_shapes().items() if n in targets}
    lora = [(r * n, adapter_dtype) for o, i in shapes.values() for n in (i, o)]  # A, B
    lora = lora * spec.num_layers
    trainable = sum(n for n, _ in lora)
    weights = total * wsize + trainable * asize
    details = {}
    if method == "qlora":
        q = spec.num_layers * sum(nf4_storage_bytes(o * i, blocksize, double_quant)
                                  for o, i in shapes.values()) + code_book_bytes(double_quant)
        weights += q - spec.num_layers * sum(o * i for o, i in shapes.values()) * wsize
        details["nf4_base"] = q
    return (weights, trainable * asize, _optimizer_bytes(optimizer, lora), trainable,
            total + trainable, details)


def _estimate_from_model(model: nn.Module, method, r, target_modules, weight_dtype,
                         adapter_dtype, optimizer, blocksize, double_quant):
    from .config import LoRAConfig
    from .inject import resolve_targets

    wsize, asize = _size(weight_dtype), _size(adapter_dtype)
    params = {id(p): p for p in model.parameters()}  # tied weights counted once
    buffers = {id(b): b for b in model.buffers()}
    total = sum(p.numel() for p in params.values())
    buf_bytes = sum(b.numel() * b.element_size() for b in buffers.values())
    if method == "full":
        trainable = [(p.numel(), weight_dtype) for p in params.values()]
        w = total * wsize + buf_bytes
        return w, total * wsize, _optimizer_bytes(optimizer, trainable), total, total, {}
    names = resolve_targets(model, LoRAConfig(r=r, target_modules=target_modules))
    mods = dict(model.named_modules())
    lora, target_numel, q = [], 0, 0
    for n in names:
        m = mods[n]
        weight = m.weight
        out_f, in_f = weight.shape if weight.dim() == 2 else (weight.numel(), 1)
        lora += [(r * in_f, adapter_dtype), (r * out_f, adapter_dtype)]
        target_numel += weight.numel()
        q += nf4_storage_bytes(weight.numel(), blocksize, double_quant)
    trainable = sum(n for n, _ in lora)
    weights = total * wsize + buf_bytes + trainable * asize
    details = {}
    if method == "qlora":
        q += code_book_bytes(double_quant)
        weights += q - target_numel * wsize
        details["nf4_base"] = q
    return (weights, trainable * asize, _optimizer_bytes(optimizer, lora), trainable,
            total + trainable, details)


def estimate(model_or_config, method: str = "lora", r: int = 8,
             target_modules=LLAMA_LINEARS, weight_dtype="bf16", adapter_dtype="fp32",
             optimizer: str = "adamw", batch_size: int = 1, seq_len: int = 512,
             grad_checkpointing: bool = False, act_dtype=None, dropout: float = 0.0,
             blocksize: int = 64, double_quant: bool = True,
             mixed_precision: bool = False) -> MemoryEstimate:
    """Estimate training memory in bytes, part by part.

    Args:
        model_or_config: an `nn.Module` (its real tensors are counted; a `config`
            attribute gives the shape for activations), a `ModelSpec`, a config object
            with Hugging Face names, or a preset name (see `PRESETS`).
        method: "full", "lora" or "qlora" (NF4 base for the targeted linears).
        r: LoRA rank. target_modules: linear-layer names that get adapters
            (and NF4 weights with qlora); "all-linear" works for a model.
        weight_dtype: storage of the (frozen or trained) base weights.
        adapter_dtype: storage of the LoRA parameters (fp32 is the usual choice).
        optimizer: "adamw" (two states per trainable parameter) or "sgd" (none).
        batch_size, seq_len: tokens per step = batch_size * seq_len.
        grad_checkpointing: keep only block inputs, recompute the rest in backward.
        act_dtype: dtype of activations; defaults to weight_dtype (full, lora) or
            the adapter dtype (qlora, which computes in the adapter dtype).
        mixed_precision: full fine-tuning with fp32 master weights, gradients and AdamW
            states (16 bytes per parameter) and a bf16 forward/backward under
            `torch.autocast`; activations as `mixed_activation_bytes` counts them
            (including autocast's bf16 weight copies). Needs method="full",
            weight_dtype fp32, no act_dtype, no grad_checkpointing (not modelled yet).
    """
    _check_args(method, optimizer, r, batch_size, seq_len)
    weight_dtype, adapter_dtype = _dtype(weight_dtype, "weight_dtype"), _dtype(adapter_dtype, "adapter_dtype")
    if act_dtype is not None:
        act_dtype = _dtype(act_dtype, "act_dtype")
    dropout = _check_dropout(dropout)
    check_flag("grad_checkpointing", grad_checkpointing)
    _check_quant_args(blocksize, double_quant)
    _check_mixed_precision(mixed_precision, method, weight_dtype, act_dtype, grad_checkpointing)
    spec, model = _spec_or_model(model_or_config)
    if model is not None:
        parts = _estimate_from_model(model, method, r, target_modules, weight_dtype,
                                     adapter_dtype, optimizer, blocksize, double_quant)
        targets = LLAMA_LINEARS
        if method != "full":  # activations: the Llama linears among the resolved targets
            from .config import LoRAConfig
            from .inject import resolve_targets
            names = resolve_targets(model, LoRAConfig(r=r, target_modules=target_modules))
            targets = tuple(n for n in LLAMA_LINEARS if n in {p.split(".")[-1] for p in names})
    else:
        targets = _spec_targets(spec, target_modules)  # checked even where "full" ignores it
        targets = LLAMA_LINEARS if method == "full" else targets
        parts = _estimate_from_spec(spec, method, r, targets, weight_dtype, adapter_dtype,
                                    optimizer, blocksize, double_quant)
    weights, grads, opt, trainable, total, details = parts
    acts = 0
    if spec is not None and mixed_precision:
        acts = mixed_activation_bytes(spec, batch_size, seq_len)
        linears = sum(o * i for o, i in spec.linear_shapes().values())
        details["autocast_weight_copies"] = 2 * (spec.num_layers * linears + spec.vocab_size * spec.hidden_size)
    elif spec is not None:
        if act_dtype is None:
            act_dtype = adapter_dtype if method == "qlora" else weight_dtype
        acts = activation_bytes(spec, method, batch_size, seq_len, act_dtype, r,
                                targets, dropout, grad_checkpointing)
    return MemoryEstimate(weights, grads, opt, acts, trainable, total, details)


def _check_mixed_precision(mixed_precision, method, weight_dtype, act_dtype, grad_checkpointing) -> None:
    """Mixed precision as estimated here is one setup; other combinations are errors."""
    check_flag("mixed_precision", mixed_precision)
    if not mixed_precision:
        return
    if method != "full":
        # LoRA/QLoRA already keep fp32 adapters over a frozen low-precision base; their
        # autocast step is not measured yet (LoRALinear's in-place addmm_ rejects autocast's
        # bf16 result with fp32 adapters), so it is not estimated either.
        raise ValueError(f"mixed_precision=True applies to method='full' only, got method={method!r}")
    if weight_dtype != torch.float32:
        raise ValueError(f"mixed_precision=True keeps fp32 master weights: weight_dtype must be fp32, got {weight_dtype}")
    if act_dtype is not None:
        raise ValueError("mixed_precision=True: autocast decides each activation's dtype; "
                         f"leave act_dtype unset, got act_dtype={act_dtype}")
    if grad_checkpointing:
        raise ValueError("mixed_precision=True with grad_checkpointing=True is not estimated "
                         "(not measured yet); pass one of the two")


def _spec_or_model(model_or_config) -> tuple["ModelSpec | None", "nn.Module | None"]:
    """(spec for activations or None, the model when one is given)."""
    if isinstance(model_or_config, str):
        if model_or_config not in PRESETS:
            raise ValueError(f"model_or_config: unknown preset {model_or_config!r}; "
                             f"known: {sorted(PRESETS)}")
        return PRESETS[model_or_config], None
    if isinstance(model_or_config, nn.Module):
        cfg = getattr(model_or_config, "config", None)
        return (ModelSpec.from_config(cfg) if cfg is not None else None), model_or_config
    if isinstance(model_or_config, ModelSpec):
        return model_or_config, None
    if model_or_config is None or isinstance(model_or_config, (int, float, bool, list, tuple, dict)):
        raise TypeError(f"model_or_config must be an nn.Module, a ModelSpec, a preset name {sorted(PRESETS)} "
                        f"or a config object, got {type(model_or_config).__name__}")
    return ModelSpec.from_config(model_or_config), None


def fmt_bytes(n: float, digits: int = 2) -> str:
    """Bytes in binary units for tables and logs: "512 B", "1.50 KiB", ..., "3.00 TiB"
    (`digits` decimals above bytes)."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise TypeError(f"n must be a number of bytes (int or float), got {type(n).__name__}")
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return str(n)


def format_table(estimates: dict[str, MemoryEstimate]) -> str:
    """A Markdown table, one column per estimate."""
    if not isinstance(estimates, dict) or not estimates \
            or not all(isinstance(e, MemoryEstimate) for e in estimates.values()):
        raise ValueError("estimates must be a non-empty dict {column name: MemoryEstimate}")
    cols = list(estimates)
    lines = ["| part | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    first = estimates[cols[0]]
    for i, (part, _) in enumerate(first.rows()):
        cells = [fmt_bytes(estimates[c].rows()[i][1]) for c in cols]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    cells = [f"{estimates[c].trainable_params:,}" for c in cols]
    lines.append("| trainable params | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Measurement and the command line live beside the estimator; their names stay importable
# from here (`from lora.memory import tensor_bytes, main`) without this module importing them.
_MOVED = {"saved_activation_bytes": "memory_probe", "tensor_bytes": "memory_probe",
          "memory_usage": "memory_probe", "print_memory_usage": "memory_probe", "main": "memory_cli"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # `python -m lora.memory ...`, as the README has it
    import sys

    from lora.memory_cli import main as _main

    sys.exit(_main())
