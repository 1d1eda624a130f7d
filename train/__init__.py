"""minilora's training application: ``minilora-train``, inference and evaluation helpers.

The inference API (docs/inference.md) is importable from here and from ``minilora_train.inference``:

    from minilora_train import load_lora_model, generate_text, AdapterManager
"""

from .inference import AdapterManager, generate_text, load_lora_model

__all__ = ["AdapterManager", "generate_text", "load_lora_model"]
