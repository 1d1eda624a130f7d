"""minilora: LoRA for PyTorch from scratch, with adapters in PEFT's on-disk format.

    import minilora
    minilora.inject(model, r=16)                              # 1. inject
    opt = torch.optim.AdamW(p for _, p in minilora.lora_parameters(model))  # 2. collect
    ...train...                                               # 3. train
    minilora.save_adapter(model, "out/")                      # 4. export (PEFT loads it too)
"""

from .adapters import (active_adapter, adapter_modules, adapter_names, delete_adapter, disable_adapters,
                       lora_modules, lora_parameters, mixed_batch, set_adapter)
from .batched import AdapterBank, BankFullError
from .checkpoint import AdapterLoadError, load_adapter, read_adapter_config, validate_adapter
from .combine import add_weighted_adapter
from .config import LLAMA_TARGETS, LoRAConfig
from .dora import DoRAAdapter
from .embedding import LoRAEmbedding
from .inject import (UnsupportedLayerError, count_parameters, enable_input_require_grads, find_targets, inject,
                     mark_only_lora_trainable, print_trainable_parameters)
from .layer import LoRAAdapter, LoRALinear
from .merge import merge, merge_and_unload, unmerge
from .modules_to_save import ModuleToSave
from .quant import dequantize, quantize
from .save import lora_state_dict, peft_config, save_adapter, save_pretrained
from .weight import QuantizedWeight, QuantLinear

__version__ = "0.1.0"

__all__ = [
    "AdapterBank", "AdapterLoadError", "BankFullError", "DoRAAdapter", "LLAMA_TARGETS", "LoRAAdapter", "LoRAConfig",
    "LoRAEmbedding", "LoRALinear", "ModuleToSave", "QuantLinear", "QuantizedWeight", "UnsupportedLayerError",
    "active_adapter", "adapter_modules", "add_weighted_adapter", "adapter_names", "count_parameters", "delete_adapter",
    "dequantize", "disable_adapters", "enable_input_require_grads", "find_targets", "inject", "load_adapter",
    "lora_modules", "lora_parameters", "lora_state_dict", "mark_only_lora_trainable", "merge", "merge_and_unload",
    "mixed_batch", "peft_config", "print_trainable_parameters", "quantize", "read_adapter_config", "save_adapter",
    "save_pretrained", "set_adapter", "unmerge", "validate_adapter",
]
