"""LoRA and friends in pure PyTorch."""
from .config import LoRAConfig
from .files import load_adapter, read_adapter, save_adapter
from .inject import (
    LORA_LAYER_TYPES,
    apply_lora,
    delete_adapter,
    disable_adapters,
    lora_layers,
    mark_only_lora_as_trainable,
    merge_and_unload,
    print_trainable_parameters,
    register_lora_layer,
    set_adapter,
    trainable_parameters,
    unload,
)
from .layer import LoRAEmbedding, LoRALayer, LoRALinear
from .dora import apply_lora  # inject.apply_lora plus DoRA (config.dora)
from .qlora import QLoRALinear

__all__ = [
    "LORA_LAYER_TYPES", "LoRAConfig", "LoRAEmbedding", "LoRALayer", "LoRALinear", "apply_lora",
    "delete_adapter", "disable_adapters", "load_adapter", "lora_layers", "mark_only_lora_as_trainable",
    "merge_and_unload", "print_trainable_parameters", "QLoRALinear", "read_adapter", "register_lora_layer",
    "save_adapter", "set_adapter", "trainable_parameters", "unload",
]
