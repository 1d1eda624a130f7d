"""Folding adapters into the base weights and back."""

from __future__ import annotations

from torch import nn

from .inject import adapter_state, lora_modules, replace_module


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold the active adapter into every LoRALinear's weight (idempotent). With ``safe=True``
    a layer whose merged weight would be non-finite raises before anything is changed."""
    layers = [m for _, m in lora_modules(model)]
    if safe:
        for layer in layers:  # check all first, so a failure leaves the whole model unmerged
            if not layer.merged and layer.active_adapter is not None:
                delta = layer.adapters[layer.active_adapter].delta_weight()
                if not (layer.weight.float() + delta.to(layer.weight.device)).isfinite().all():
                    raise ValueError(f"merging adapter {layer.active_adapter!r} gives non-finite weights; "
                                     "nothing was merged (the adapter has likely diverged)")
    for layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract merged adapters again (idempotent)."""
    for _, layer in lora_modules(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge the active adapter and put plain nn.Linear modules back (same weight objects), so
    ``model.save_pretrained`` writes an ordinary checkpoint. Other adapters are dropped."""
    merge(model, safe=safe)
    for name, layer in list(lora_modules(model)):
        replace_module(model, name, layer.to_linear())
    state = adapter_state(model)
    state.configs.clear()
    state.layers = None
    return model
