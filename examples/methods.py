"""The fine-tuning methods of the demo, as functions of a freshly loaded model.

Every method starts from the same pretrained `Llama`; `prepare` turns it into what the
method trains (or leaves it alone for in-context learning) and reports its parameter
counts. All LoRA/QLoRA work goes through the project's `lora` and `quant` packages.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

import lora.qlora  # noqa: F401  (registers QLoRALinear as the LoRA wrapper of quant.LinearNF4)
from lora import (
    LoRAConfig,
    PromptTunedModel,
    PromptTuning,
    add_adapters,
    apply_lora,
    load_adapter,
    read_adapter,
    save_adapter,
    trainable_parameters,
)
from lora.config import rewrites_base
from lora.init import LOFTQ_QUANT_TYPES, olora, pissa
from lora.model_state import lora_configs
from quant import LinearNF4, quantize_model

# The linear layers of a Llama block (QLoRA sec. 4: adapters on all of them).
ADAPTER_BOTTLENECK = 64  # Houlsby sec. 3.1 tries 8-256; 64 gives about LoRA r=16's parameter count here
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ICL = ("zero-shot", "one-shot", "few-shot")  # weights untouched, examples in the prompt
TRAINED = ("full", "lora", "qlora", "adapter", "prompt")  # adapter: Houlsby bottleneck; prompt: soft prompt
PROMPT_TOKENS = 20  # Lester sec. 3: 20 virtual tokens already come close to 100 on large models
PROMPT_INIT_TEXT = "Extract the name, age and city from the sentence as one line of JSON."  # Lester sec. 2.2
METHODS = ICL + TRAINED
# How the LoRA adapter starts (lora/init.py): "kaiming" / "gaussian" with B = 0 (LoRA, QLoRA);
# "loftq" (Li et al. 2023), "pissa" (Meng et al. 2024), "olora" (Buyukakyuz 2024) rewrite the base.
INITS = ("kaiming", "gaussian", "loftq", "pissa", "olora")
BITS = tuple(LOFTQ_QUANT_TYPES)  # QLoRA's base: 4 -> NF4, 3 -> NF3, 2 -> NF2 (all stored in 4 bits)


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the blocks' linear layers: plain, 4-bit or LoRA-wrapped."""
    return [(n, m) for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in BLOCK_LINEARS and ".layers." in f".{n}"]


def base_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the block linear weights in bf16, bytes as stored now).

    Stored bytes count a `LinearNF4` as packed codes + absmax (+ nested absmax), the
    4.127 bits per weight of QLoRA sec. 3, and a plain layer at its dtype's size."""
    bf16 = stored = 0
    for _, m in block_linears(model):
        base = getattr(m, "base_layer", m)
        if isinstance(base, LinearNF4):
            bf16 += 2 * base.in_features * base.out_features
            stored += base.storage_bytes()
        elif isinstance(base, nn.Linear):
            bf16 += 2 * base.weight.numel()
            stored += base.weight.numel() * base.weight.element_size()
    return bf16, stored


def lora_config(r: int, alpha: float, dropout: float, init: str = "kaiming") -> LoRAConfig:
    return LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=list(BLOCK_LINEARS), init=init)


NF4_SETTINGS = dict(quant_type="nf4", blocksize=64, double_quant=True)  # QLoRA sec. 3


def quant_settings(bits: int = 4) -> dict:
    """QLoRA's base settings (sec. 3: blocksize 64, double quantization) with the NF type of `bits`."""
    return {**NF4_SETTINGS, "quant_type": LOFTQ_QUANT_TYPES[bits]}


def check_init_and_bits(method: str, init: str = "kaiming", bits: int = 4,
                        compute_dtype: torch.dtype = torch.float32) -> None:
    """ValueError for a start or a base width that `method` cannot have, before anything loads."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))} (NF4, NF3, NF2 base), got {bits!r}")
    if bits != 4 and method != "qlora":
        raise ValueError(f"bits={bits} sets the quantized base of method 'qlora'; method {method!r} has no "
                         "quantized base")
    if init != "kaiming" and method not in ("lora", "qlora"):
        raise ValueError(f"init={init!r} starts a LoRA adapter; method {method!r} has none (use lora or qlora)")
    if init == "loftq" and method != "qlora":
        raise ValueError("init='loftq' quantizes the base (LoftQ: dequant(Q) + B A ~ W); use method 'qlora', "
                         "with bits for the base's width")
    if method == "qlora" and rewrites_base(init) and compute_dtype != torch.float32:
        raise ValueError(f"init={init!r} on a quantized base computes in float32 here; got compute_dtype "
                         f"{compute_dtype} (use float32 or init kaiming/gaussian)")


def nf4_factory(compute_dtype: torch.dtype = torch.float32, bits: int = 4):
    """For `load_llama(linear_factory=...)`: quantize each block weight as it is read
    (NF4, or NF3 / NF2 for `bits` 3 / 2)."""
    def make(weight: torch.Tensor) -> LinearNF4:
        out_features, in_features = weight.shape
        return LinearNF4(in_features, out_features, bias=False, weight=weight,
                         compute_dtype=compute_dtype, **quant_settings(bits))
    return make


def load_model(method: str, path=None, compute_dtype: torch.dtype = torch.float32, bits: int = 4,
               init: str = "kaiming"):
    """(model, tokenizer) of a GGUF file (default SmolLM2-135M-Instruct) or a Hugging Face
    safetensors folder, quantizing the block linears while loading for QLoRA, unless `init`
    starts from the full-precision weights (LoftQ, PiSSA, OLoRA: `prepare` quantizes)."""
    from examples.gguf_loader import load_llama
    from examples.hf_loader import is_hf_folder, load_hf_llama

    factory = nf4_factory(compute_dtype, bits) if method == "qlora" and not rewrites_base(init) else None
    if path is not None and is_hf_folder(path):
        return load_hf_llama(path, linear_factory=factory)
    return load_llama(path, linear_factory=factory)


def quantize_blocks(model: nn.Module, compute_dtype: torch.dtype, bits: int = 4) -> None:
    """NF4 (NF3, NF2 for `bits` 3, 2) with double quantization (QLoRA sec. 3, blocksize 64) for
    every block linear that is still a plain `nn.Linear` (none when loaded with `nf4_factory`)."""
    if any(type(m) is nn.Linear for _, m in block_linears(model)):
        quantize_model(model, target_modules=list(BLOCK_LINEARS), compute_dtype=compute_dtype,
                       progress=True, **quant_settings(bits))


def start_lora(model: nn.Module, config: LoRAConfig, bits: int | None = None,
               compute_dtype: torch.dtype = torch.float32, loftq_iter: int = 1) -> None:
    """LoRA (float32 adapters) on the block linears, started by `config.init`, in place.

    `bits` None: the base stays as it is (dense, or already quantized). 4 / 3 / 2: the dense
    block linears become NF4 / NF3 / NF2 (`quant_settings`), with the adapter started as:

    * "kaiming" / "gaussian": Q = quant(W), B = 0 (QLoRA);
    * "loftq": `apply_lora(..., init="loftq")`, Li et al. 2023 Algorithm 1 (T = `loftq_iter`);
    * "pissa" / "olora": QPiSSA (Meng et al. 2024, sec. 4): the factors from the full-precision
      W (`lora.init.pissa` / `olora`), the residual `W - s B A` quantized as the base. The
      adapter's config records the init, so its file is refused on an original base.
    """
    if bits is not None:
        _check_blocks_for(model, config.init, bits)
    # Adapters in float32 whatever the base computes in: AdamW updates of bf16 weights
    # round away (QLoRA keeps optimizer states in fp32 too, sec. 3 "paged optimizers").
    if bits is None or not rewrites_base(config.init):
        if bits is not None:
            quantize_blocks(model, compute_dtype, bits)
        apply_lora(model, config, dtype=torch.float32)
    elif config.init == "loftq":
        apply_lora(model, dataclasses.replace(config, loftq_bits=bits, loftq_iter=loftq_iter), dtype=torch.float32)
    else:
        _quantized_residual_lora(model, config, bits, compute_dtype)


def _check_blocks_for(model: nn.Module, init: str, bits: int) -> None:
    """A base already quantized to another type would silently stay so; a rewriting init needs W."""
    quant_type = LOFTQ_QUANT_TYPES[bits]
    for name, m in block_linears(model):
        if isinstance(m, LinearNF4) and (rewrites_base(init) or m.quant_type != quant_type):
            need = "its full-precision weight" if rewrites_base(init) else f"a dense or {quant_type} layer"
            raise ValueError(f"{name} is already a {m.quant_type} layer; bits={bits} with init={init!r} needs "
                             f"{need} (load the model with load_model(..., bits=..., init=...))")


@torch.no_grad()
def _quantized_residual_lora(model: nn.Module, config: LoRAConfig, bits: int, compute_dtype: torch.dtype) -> None:
    """QPiSSA / OLoRA on a quantized base: factor each dense W, quantize `W - s B A`, wrap, copy (A, B)."""
    factor = pissa if config.init == "pissa" else olora
    scaling = config.alpha / config.r
    starts = {}
    for name, linear in block_linears(model):
        res = factor(linear.weight.detach(), config.r, scaling=scaling, dtype=torch.float32)
        base = LinearNF4(linear.in_features, linear.out_features, bias=False, weight=res.base.float(),
                         compute_dtype=compute_dtype, **quant_settings(bits))
        model.set_submodule(name, base)
        starts[name] = (res.A, res.B)
    apply_lora(model, dataclasses.replace(config, init="kaiming"), dtype=torch.float32)
    for name, (A, B) in starts.items():
        layer = model.get_submodule(name)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        layer.initial_factors["default"] = (A.clone(), B.clone())  # as LoRALinear.init_from_weight keeps them
    lora_configs(model)["default"] = dataclasses.replace(config)  # the file says which init rewrote the base


class SoftPromptLlama(PromptTunedModel):
    """The in-repo Llama behind a learned soft prompt (`lora.PromptTuning`), with the
    `hidden` / `lm_head` / `generate` interface the training loop and evaluation use.
    The p virtual tokens sit at positions 0..p-1, in training and in generation alike."""

    def __init__(self, llama: nn.Module, prompt: PromptTuning):
        super().__init__(llama, prompt)
        self.config = llama.config

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) hidden states of the real tokens (the soft prompt's are dropped)."""
        embeds = self.prompt(idx)["inputs_embeds"]  # (B, p + T, dim)
        return self.model.hidden(inputs_embeds=embeds)[:, self.prompt.num_virtual_tokens:]

    def generate(self, prompts: list[list[int]], **kwargs) -> list[list[int]]:
        return self.model.generate(prompts, prefix_embeds=self.prompt.prompt_embeddings, **kwargs)


def prepare(model: nn.Module, method: str, r: int = 16, alpha: float = 32, dropout: float = 0.0,
            compute_dtype: torch.dtype = torch.float32, prompt_init: list[int] | str = "vocab",
            init: str = "kaiming", bits: int = 4) -> tuple[nn.Module, dict]:
    """Make `model` ready for `method`; returns the model to train (the same object, or a
    soft-prompt wrapper around it for "prompt") and its parameter counts.

    `prompt_init`: the soft prompt's initial token ids (or "vocab" / "random").
    `init`, `bits`: how LoRA / QLoRA adapters start and QLoRA's base width (`start_lora`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_init_and_bits(method, init, bits, compute_dtype)
    if method == "adapter":
        # Houlsby sec. 2.1: one bottleneck after the attention and one after the MLP of each block.
        add_adapters(model, after=["self_attn", "mlp"], bottleneck=ADAPTER_BOTTLENECK)
    elif method in ("lora", "qlora"):
        start_lora(model, lora_config(r, alpha, dropout, init), bits if method == "qlora" else None, compute_dtype)
    elif method == "prompt":
        model = SoftPromptLlama(model, PromptTuning(PROMPT_TOKENS, model.model.embed_tokens, prompt_init))
    else:
        model.requires_grad_(method == "full")
    trainable, total = trainable_parameters(model)
    return model, {"trainable_params": trainable, "all_params": total,
                   "trainable_pct": 100.0 * trainable / total}


def save_what_must_be_saved(model: nn.Module, method: str, directory: Path) -> int:
    """Write what a user must keep to reproduce the method; return its size in bytes.

    LoRA/QLoRA/bottleneck adapters, soft prompts: the adapter folder (PEFT layout). Full fine-tuning: every weight, counted
    at fp32 without writing 0.5 GB. In-context learning: nothing (the prompt is the method).
    """
    if method in ("lora", "qlora", "adapter", "prompt"):
        paths = save_adapter(model, directory)
        return sum(f.stat().st_size for p in paths for f in Path(p).iterdir() if f.is_file())
    if method == "full":
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return 0


def lora_config_of(directory: Path, refusal: str) -> LoRAConfig:
    """The `LoRAConfig` of a saved adapter folder; ValueError naming the folder's PEFT type and
    `refusal` (what the caller takes) for any other kind of adapter."""
    config, _ = read_adapter(directory)
    if not isinstance(config, LoRAConfig):
        kind = config.get("peft_type", "unknown") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{directory} holds a {kind} adapter; {refusal}")
    return config


def reload_adapter(model: nn.Module, method: str, directory: Path,
                   compute_dtype: torch.dtype = torch.float32, bits: int = 4) -> None:
    """Load a saved adapter into a freshly loaded model (quantizing it first for QLoRA, to
    `bits`). An adapter whose init rewrote the base (LoftQ, PiSSA, OLoRA; its file says so)
    needs that base: the init runs again on the fresh full-precision model (`start_lora`,
    deterministic) and the file's factors replace the initial ones."""
    config = lora_config_of(directory, "only LoRA adapters can be reloaded here")  # adapters in float32 as trained
    if rewrites_base(config.init) and any(not isinstance(m, nn.Linear) for _, m in block_linears(model)):
        raise ValueError(f"{directory}: init={config.init!r} rewrote the base it was trained on; reloading it "
                         "needs the full-precision model (load_model(..., init=...)) to rewrite the base again")
    start_lora(model, config, bits if method == "qlora" else None, compute_dtype, config.loftq_iter)
    load_adapter(model, directory, rewritten_base=rewrites_base(config.init))
    model.requires_grad_(False)
