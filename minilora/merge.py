"""Folding adapters into the base weights and back."""

from __future__ import annotations

from torch import nn

from .inject import adapter_state, lora_modules, replace_module


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold the active adapter into every LoRALinear's weight (idempotent). With ``safe=True``
    a layer whose merged weight would be non-finite in the weight's own dtype (an fp16 base
    overflows above 65504) raises before anything is changed.

    A weight the layer shares with another module (an LM head tied to the input embeddings)
    is untied first: the layer merges into its own copy, ``config.tie_word_embeddings``
    becomes False while merged (so ``save_pretrained`` writes both matrices and a reload keeps
    them apart), and ``unmerge`` puts the shared weight and the tie back. Otherwise merging
    the head would also rewrite the input embeddings, and merged logits would differ from
    unmerged ones.
    """
    layers = [m for _, m in lora_modules(model)]
    if any(m.disabled for m in layers):
        raise ValueError("adapters are disabled here (inside `with minilora.disable_adapters(model):`); a merged "
                         "adapter cannot be disabled, so the block would run adapted. Merge after the block")
    if any(m.row_adapters is not None for m in layers):
        raise ValueError("a mixed batch is active (inside `with minilora.mixed_batch(...)`); merging would give every "
                         "row the active adapter. Merge after the block")
    pending = [m for m in layers if not m.merged and m.active_adapter is not None]
    if safe:
        for layer in pending:  # check all first, so a failure leaves the whole model unmerged
            merged = (layer.weight.float() + layer.adapters[layer.active_adapter].delta_weight()
                      .to(layer.weight.device)).to(layer.weight.dtype)
            if not merged.isfinite().all():
                raise ValueError(f"merging adapter {layer.active_adapter!r} gives non-finite weights in "
                                 f"{layer.weight.dtype}; nothing was merged (the adapter has likely diverged, "
                                 "or the base's dtype cannot hold the merged values: merge in float32)")
    _untie(model, pending)
    for layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract merged adapters again (idempotent); a weight untied by ``merge`` is tied again."""
    untied = adapter_state(model).untied
    retie = bool(untied)
    for name, layer in lora_modules(model):
        layer.unmerge()
        if name in untied:  # the original shared Parameter, never modified: exact
            layer.weight = untied.pop(name)
    if retie and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = True
    return model


def _untie(model: nn.Module, layers: list) -> None:
    """Give each of ``layers`` (LoRALinear) whose weight another module also holds its own copy."""
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    untied = adapter_state(model).untied
    for name, layer in lora_modules(model):
        if any(layer is m for m in layers) and owners.get(id(layer.weight), 0) > 1:
            untied[name] = layer.weight  # kept for unmerge, outside the module (not a second parameter)
            layer.weight = nn.Parameter(untied[name].detach().clone(), requires_grad=untied[name].requires_grad)
    if untied and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = False


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge the active adapter and put plain nn.Linear modules back (same weight objects), so
    ``model.save_pretrained`` writes an ordinary checkpoint. Other adapters are dropped."""
    merge(model, safe=safe)
    for name, layer in list(lora_modules(model)):
        replace_module(model, name, layer.to_linear())  # a layer merge untied keeps its merged copy
    state = adapter_state(model)
    state.configs.clear()
    state.untied.clear()
    state.layers = None
    return model
