"""Folding adapters into the base weights and back."""

from __future__ import annotations

from torch import nn

from .embedding import LoRAEmbedding
from .inject import _remove_save_pretrained, adapter_modules, adapter_state, lora_modules, replace_module
from .modules_to_save import ModuleToSave


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold the active adapter into every LoRA layer's weight (idempotent). With ``safe=True``
    a layer whose merged weight would be non-finite raises before anything is changed.
    modules_to_save copies need no merging: the active adapter's copy keeps running."""
    layers = [m for _, m in lora_modules(model)]
    _refuse_tied_embedding_merge(model, layers)
    if safe:
        for layer in layers:  # check all first, so a failure leaves the whole model unmerged
            if not layer.merged and layer.active_adapter is not None:
                adapter = layer.adapters[layer.active_adapter]
                if isinstance(layer, LoRAEmbedding):  # its delta is (dim, vocab), its weight (vocab, dim)
                    merged = layer.weight.float() + adapter.delta_weight().t().to(layer.weight.device)
                else:
                    merged = adapter.merged_weight(layer.weight)  # with DoRA's rescaling for DoRA adapters
                if not merged.isfinite().all():
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
    """Merge the active adapter and put plain nn.Linear / nn.Embedding modules back (same weight
    objects), and in place of each modules_to_save module the active adapter's trained copy, so
    ``model.save_pretrained`` (the model's own again) writes an ordinary checkpoint. Other
    adapters are dropped."""
    merge(model, safe=safe)
    for name, layer in list(adapter_modules(model)):
        if isinstance(layer, ModuleToSave):
            replace_module(model, name, layer.unload())
        else:
            replace_module(model, name, layer.to_embedding() if isinstance(layer, LoRAEmbedding) else layer.to_linear())
    _untie_in_config(model)
    _remove_save_pretrained(model)
    state = adapter_state(model)
    state.configs.clear()
    state.layers = None
    return model


def _refuse_tied_embedding_merge(model: nn.Module, layers) -> None:
    """Merging into an embedding whose weight the output head shares would change the head too,
    which the unmerged model never did."""
    for layer in layers:
        if isinstance(layer, LoRAEmbedding) and not layer.merged and layer.active_adapter is not None:
            sharers = [n for n, p in model.named_parameters(remove_duplicate=False) if p is layer.weight]
            if len(sharers) > 1:
                raise ValueError(f"cannot merge the embedding adapter: its weight is tied ({', '.join(sharers)}), so "
                                 "merging would change the output head as well; keep the adapter unmerged, or "
                                 "untie the weights before injecting")


def _untie_in_config(model: nn.Module) -> None:
    """After unloading, a modules_to_save copy of lm_head or embed_tokens may no longer share its
    weight with the other; then a config that says the two are tied would make transformers drop
    one of them on save (and tie them again on load), so it is set to say they are not."""
    config = getattr(model, "config", None)
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (getattr(config, "tie_word_embeddings", False) and callable(get_in) and callable(get_out)):
        return
    embeddings, head = get_in(), get_out()
    if embeddings is not None and head is not None and head.weight is not embeddings.weight:
        config.tie_word_embeddings = False
