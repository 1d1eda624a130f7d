"""Folding adapters into the base weights and back."""

from __future__ import annotations

import torch
from torch import nn

from . import quant
from .inject import _replace, lora_modules


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold the active adapter into every LoRALinear's weight (idempotent). With ``safe=True``
    a layer whose merged weight would be non-finite raises before anything is changed."""
    layers = [m for _, m in lora_modules(model)]
    quantized = next((name for name, m in lora_modules(model) if m.quantized and m.active_adapter), None)
    if quantized is not None:
        raise ValueError(f"{quantized} has a quantized base: merging would quantize the sum again, losing most of "
                         "the adapter; use minilora.merge_and_unload(model) for plain Linears in the compute dtype")
    if safe:
        _check_finite(layers)
    for layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract merged adapters again (idempotent)."""
    for _, layer in lora_modules(model):
        layer.unmerge()
    return model


def _check_finite(layers) -> None:
    """Raise if merging any layer's active adapter would give non-finite weights (a quantized
    base is dequantized one layer at a time for the check)."""
    for layer in layers:  # check all first, so a failure leaves the whole model unmerged
        if not layer.merged and layer.active_adapter is not None:
            delta = layer.adapters[layer.active_adapter].delta_weight()
            if not (quant.dense(layer.weight, torch.float32) + delta.to(layer.weight.device)).isfinite().all():
                raise ValueError(f"merging adapter {layer.active_adapter!r} gives non-finite weights; "
                                 "nothing was merged (the adapter has likely diverged)")


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge the active adapter and put plain nn.Linear modules back (same weight objects), so
    ``model.save_pretrained`` writes an ordinary checkpoint. Other adapters are dropped.

    A quantized base (minilora.quantize) is dequantized first, one layer at a time, into the
    compute dtype, and every quantized Linear becomes a plain one: each merged weight is
    ``round(round(dequantized) + B·A·scaling)``, the same merge a base holding the dequantized
    weights in that dtype would get (the adapter was trained against exactly those weights)."""
    if safe:
        _check_finite([m for _, m in lora_modules(model)])
    quant.dequantize(model)
    merge(model, safe=False)
    for name, layer in list(lora_modules(model)):
        _replace(model, name, layer.to_linear())
    model.__dict__.pop("_minilora_configs", None)
    model.__dict__.pop("_minilora_layers", None)
    return model
