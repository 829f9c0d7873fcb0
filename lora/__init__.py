"""LoRA and friends in pure PyTorch."""
from . import init  # PiSSA, OLoRA, LoftQ as plain functions of one weight
from .adapters import Adapter, AdapterConfig, add_adapters, remove_adapters
from .combine import combine_adapters
from .config import LoRAConfig
from .conv import LoRAConv, LoRAConv1d, LoRAConv2d, LoRAConv3d
from .files import load_adapter, read_adapter, save_adapter
from .hotswap import hotswap_adapter, prepare_for_hotswap
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
from .layer import DoraMagnitude, LoRAEmbedding, LoRALayer, LoRALinear
from .mha import LoRAMultiheadAttention
from .mixed_batch import enable_adapter_names, use_adapters
from .modules_to_save import ModulesToSave
from .param_wrapper import LoRAParameter
from .prompt_tuning import PromptTunedModel, PromptTuning, add_prompt_tuning
from .qlora import QLoRALinear
from .trainable_tokens import TrainableTokens
from .variants import LoraVariant

__all__ = [
    "Adapter", "AdapterConfig", "init", "DoraMagnitude", "LORA_LAYER_TYPES", "LoRAConfig", "LoRAEmbedding", "LoRALayer",
    "LoRALinear", "PromptTunedModel", "PromptTuning", "QLoRALinear", "add_adapters", "add_prompt_tuning",
    "apply_lora", "combine_adapters", "delete_adapter", "disable_adapters", "load_adapter", "lora_layers",
    "mark_only_lora_as_trainable", "merge_and_unload", "print_trainable_parameters", "read_adapter",
    "register_lora_layer", "remove_adapters", "save_adapter", "set_adapter", "trainable_parameters", "unload",
    "LoRAConv", "LoRAConv1d", "LoRAConv2d", "LoRAConv3d", "LoRAMultiheadAttention", "LoraVariant",
    "enable_adapter_names", "hotswap_adapter", "prepare_for_hotswap", "use_adapters",
    "LoRAParameter", "ModulesToSave", "TrainableTokens",
]
