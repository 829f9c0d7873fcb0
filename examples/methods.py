"""The fine-tuning methods of the demo, as functions of a freshly loaded model.

Every method starts from the same pretrained `Llama`; `prepare` turns it into what the
method trains (or leaves it alone for in-context learning) and reports its parameter
counts. All LoRA/QLoRA work goes through the project's `lora` and `quant` packages.
"""
from __future__ import annotations

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
from quant import LinearNF4, quantize_model

# The linear layers of a Llama block (QLoRA sec. 4: adapters on all of them).
ADAPTER_BOTTLENECK = 64  # Houlsby sec. 3.1 tries 8-256; 64 gives about LoRA r=16's parameter count here
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ICL = ("zero-shot", "one-shot", "few-shot")  # weights untouched, examples in the prompt
TRAINED = ("full", "lora", "qlora", "adapter", "prompt")  # adapter: Houlsby bottleneck; prompt: soft prompt
PROMPT_TOKENS = 20  # Lester sec. 3: 20 virtual tokens already come close to 100 on large models
PROMPT_INIT_TEXT = "Extract the name, age and city from the sentence as one line of JSON."  # Lester sec. 2.2
METHODS = ICL + TRAINED


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


def lora_config(r: int, alpha: float, dropout: float) -> LoRAConfig:
    return LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=list(BLOCK_LINEARS))


NF4_SETTINGS = dict(quant_type="nf4", blocksize=64, double_quant=True)  # QLoRA sec. 3


def nf4_factory(compute_dtype: torch.dtype = torch.float32):
    """For `load_llama(linear_factory=...)`: quantize each block weight as it is read."""
    def make(weight: torch.Tensor) -> LinearNF4:
        out_features, in_features = weight.shape
        return LinearNF4(in_features, out_features, bias=False, weight=weight,
                         compute_dtype=compute_dtype, **NF4_SETTINGS)
    return make


def load_model(method: str, path=None, compute_dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a GGUF file (default SmolLM2-135M-Instruct) or a Hugging Face
    safetensors folder, quantizing the block linears while loading for QLoRA."""
    from examples.gguf_loader import load_llama
    from examples.hf_loader import is_hf_folder, load_hf_llama

    factory = nf4_factory(compute_dtype) if method == "qlora" else None
    if path is not None and is_hf_folder(path):
        return load_hf_llama(path, linear_factory=factory)
    return load_llama(path, linear_factory=factory)


def quantize_blocks(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """NF4 with double quantization (QLoRA sec. 3, blocksize 64) for every block linear
    that is still a plain `nn.Linear` (none when loaded with `nf4_factory`)."""
    if any(type(m) is nn.Linear for _, m in block_linears(model)):
        quantize_model(model, target_modules=list(BLOCK_LINEARS), compute_dtype=compute_dtype,
                       progress=True, **NF4_SETTINGS)


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
            compute_dtype: torch.dtype = torch.float32, prompt_init: list[int] | str = "vocab"
            ) -> tuple[nn.Module, dict]:
    """Make `model` ready for `method`; returns the model to train (the same object, or a
    soft-prompt wrapper around it for "prompt") and its parameter counts.

    `prompt_init`: the soft prompt's initial token ids (or "vocab" / "random")."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "qlora":
        quantize_blocks(model, compute_dtype)
    if method == "adapter":
        # Houlsby sec. 2.1: one bottleneck after the attention and one after the MLP of each block.
        add_adapters(model, after=["self_attn", "mlp"], bottleneck=ADAPTER_BOTTLENECK)
    elif method in ("lora", "qlora"):
        # Adapters in float32 whatever the base computes in: AdamW updates of bf16 weights
        # round away (QLoRA keeps optimizer states in fp32 too, sec. 3 "paged optimizers").
        apply_lora(model, lora_config(r, alpha, dropout), dtype=torch.float32)
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


def reload_adapter(model: nn.Module, method: str, directory: Path,
                   compute_dtype: torch.dtype = torch.float32) -> None:
    """Load a saved adapter into a freshly loaded model (quantizing it first for QLoRA)."""
    config, _ = read_adapter(directory)  # the file's own config, adapters in float32 as trained
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"{directory} holds a {type(config).__name__} adapter; only LoRA adapters "
                         "can be reloaded here")
    if method == "qlora":
        quantize_blocks(model, compute_dtype)
    apply_lora(model, config, dtype=torch.float32)
    load_adapter(model, directory)
    model.requires_grad_(False)
