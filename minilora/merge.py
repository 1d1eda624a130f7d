"""Folding adapters into the base weights and back."""

from __future__ import annotations

from torch import nn

from . import quant
from .weight import QuantizedBaseError, dense, is_quantized
from .embedding import LoRAEmbedding
from .adapters import adapter_modules, adapter_state, lora_modules
from .inject import replace_module
from .modules_to_save import ModuleToSave
from .trainers import uninstall


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold the active adapter into every LoRA layer's weight (idempotent). With ``safe=True``
    a layer whose merged weight would be non-finite in the weight's own dtype (an fp16 base
    overflows above 65504) raises before anything is changed. modules_to_save copies need no
    merging: the active adapter's copy keeps running.

    A Linear weight the layer shares with another module (an LM head tied to the input
    embeddings) is untied first: the layer merges into its own copy, ``config.tie_word_embeddings``
    becomes False while merged (so ``save_pretrained`` writes both matrices and a reload keeps
    them apart), and ``unmerge`` puts the shared weight and the tie back. Otherwise merging the
    head would also rewrite the input embeddings, and merged logits would differ from unmerged
    ones. (A tied embedding carrying LoRA is refused instead, see _refuse_tied_embedding_merge.)
    """
    layers = [m for _, m in lora_modules(model)]
    if any(m.disabled for m in layers):
        raise ValueError("adapters are disabled here (inside `with minilora.disable_adapters(model):`); a merged "
                         "adapter cannot be disabled, so the block would run adapted. Merge after the block")
    if any(m.row_adapters is not None for m in layers):
        raise ValueError("a mixed batch is active (inside `with minilora.mixed_batch(...)`); merging would give every "
                         "row the active adapter. Merge after the block")
    quantized = next((name for name, m in lora_modules(model)
                      if is_quantized(m.weight) and m.active_adapter), None)
    if quantized is not None:
        raise QuantizedBaseError(f"{quantized} has a quantized base: merging would quantize the sum again, losing most of "
                         "the adapter; use minilora.merge_and_unload(model) for plain Linears in the compute dtype")
    _refuse_tied_embedding_merge(model, layers)
    pending = [m for m in layers if not m.merged and m.active_adapter is not None]
    if safe:
        _check_finite(pending)
    _untie(model, [m for m in pending if not isinstance(m, LoRAEmbedding)])
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


def _check_finite(pending) -> None:
    """Raise if merging any of ``pending``'s active adapters gives non-finite weights; all are
    checked first, so a failure leaves the whole model unmerged (a quantized base is dequantized
    one layer at a time for the check)."""
    for layer in pending:
        adapter, weight = layer.adapters[layer.active_adapter], dense(layer.weight)
        if isinstance(layer, LoRAEmbedding):  # its delta is (dim, vocab), its weight (vocab, dim)
            merged = weight.float() + adapter.delta_weight().t().to(weight.device)
        else:
            merged = adapter.merged_weight(weight)  # with DoRA's rescaling for DoRA adapters
        if not merged.to(weight.dtype).isfinite().all():  # in the weight's dtype: fp16 overflows at 65504
            raise ValueError(f"merging adapter {layer.active_adapter!r} gives non-finite weights in "
                             f"{weight.dtype}; nothing was merged (the adapter has likely diverged, "
                             "or the base's dtype cannot hold the merged values: merge in float32)")


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge the active adapter and put plain nn.Linear / nn.Embedding modules back (same weight
    objects), and in place of each modules_to_save module the active adapter's trained copy, so
    ``model.save_pretrained`` (the model's own again) writes an ordinary checkpoint. Other
    adapters are dropped.

    A quantized base (minilora.quantize) is dequantized first, one layer at a time, into the
    compute dtype, and every quantized Linear becomes a plain one: each merged weight is
    ``round(round(dequantized) + B·A·scaling)``, the same merge a base holding the dequantized
    weights in that dtype would get (the adapter was trained against exactly those weights)."""
    layers = [m for _, m in lora_modules(model)]
    if safe:  # before dequantizing anything
        _check_finite([m for m in layers if not m.merged and m.active_adapter is not None])
    _refuse_tied_embedding_merge(model, layers)
    quant.dequantize(model)
    merge(model, safe=False)
    for name, layer in list(adapter_modules(model)):
        if isinstance(layer, ModuleToSave):
            replace_module(model, name, layer.unload())
        else:
            replace_module(model, name, layer.to_embedding() if isinstance(layer, LoRAEmbedding) else layer.to_linear())
    _untie_in_config(model)
    uninstall(model)
    state = adapter_state(model)
    state.configs.clear()
    state.untied.clear()  # a layer merge untied keeps its merged copy: the tie is gone for good
    state.layers = None
    return model


def _refuse_tied_embedding_merge(model: nn.Module, layers) -> None:
    """Merging into an embedding whose weight the output head shares would change the head too,
    which the unmerged model never did."""
    for layer in layers:
        if isinstance(layer, LoRAEmbedding) and not layer.merged and layer.active_adapter is not None:
            # a Parameter, or a quantized table (merge_and_unload checks before dequantizing it)
            sharers = [f"{n}.{attr}" for n, _, attr in quant.weight_holders(model).get(id(layer.weight), [])]
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
