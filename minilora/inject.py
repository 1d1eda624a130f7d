"""Module surgery: put LoRALinear (and LoRAEmbedding, ModuleToSave) in place of the targeted
modules, and set the model up to train only the adapter: freezing, counting parameters, and the
input gradients that checkpointing needs. Switching between adapters is minilora.adapters'."""

from __future__ import annotations

import math
import re
import weakref
from typing import Optional

import torch
from torch import nn

from .adapters import (LORA_LAYERS, adapter_modules, adapter_names, adapter_state, bias_parameters,
                       check_not_disabled, lora_modules, lora_parameters, set_adapter)
from .config import LoRAConfig, inside_adapters, matches
from .dora import DoRAAdapter, check_base
from .embedding import LoRAEmbedding
from .layer import LoRALinear
from .modules_to_save import ModuleToSave, find_modules_to_save, tie_copies
from .trainers import install, refuse_peft_on_top
from .weight import QuantEmbedding, QuantizedWeight, QuantLinear

# What LoRA adapts as a Linear: nn.Linear, a Linear over a quantized weight (minilora.quantize),
# and LoRALinear layers that already hold another adapter.
LINEARS = (nn.Linear, QuantLinear, LoRALinear)
# What LoRA adapts as an embedding: likewise, plain, quantized (minilora.quantize(..., embeddings=True)) or adapted.
EMBEDDINGS = (nn.Embedding, QuantEmbedding, LoRAEmbedding)


class UnsupportedLayerError(ValueError):
    """A targeted module that LoRALinear cannot stand in for faithfully: a quantized Linear
    (bitsandbytes' Linear4bit/Linear8bitLt: integer weights, their own forward) or any other
    nn.Linear subclass with its own forward; or a layer of zero size. Raised by ``inject`` (and
    ``quantize``) before the model changes."""


# nn.Linear subclasses that override forward yet compute x Wᵀ + b on a weight LoRALinear can use
# (e.g. minilora's own quantized base): admitted by admit_linear_type.
_ADMITTED_LINEAR_TYPES: set = set()


def admit_linear_type(cls: type) -> type:
    """Let ``inject`` adapt modules of class ``cls`` although its forward is not nn.Linear's
    (for a Linear subclass whose adapted form LoRALinear implements). Returns ``cls``."""
    _ADMITTED_LINEAR_TYPES.add(cls)
    return cls


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why LoRALinear cannot replace ``module`` without changing what it computes (None: it can).

    LoRALinear keeps the module's ``weight`` and ``bias`` and runs nn.Linear's ``x Wᵀ + b``
    itself, so anything a subclass's own forward did is dropped, and an integer (quantized)
    weight would be multiplied as if it were the real one."""
    if not isinstance(module, nn.Linear) or type(module) in _ADMITTED_LINEAR_TYPES:
        return None  # LoRA layers already, or embeddings (find_targets judges those)
    if type(module).forward is not nn.Linear.forward:
        return f"a {type(module).__qualname__}, an nn.Linear subclass with its own forward, which LoRA would drop"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        kind = f"{weight.dtype} {type(weight).__name__}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        return f"a {type(module).__qualname__} whose weight is a {kind}, not a floating-point tensor (quantized?)"
    return None


def inject(model: nn.Module, config: Optional[LoRAConfig] = None, *, adapter_name: str = "default",
           **fields) -> nn.Module:
    """Add a LoRA adapter to every targeted nn.Linear of ``model``, in place.

    ``config`` and keyword ``fields`` (``r=16``, ``target_modules=[...]``, …) combine: fields
    override the config. Everything but the new adapter is frozen (biases train per
    ``config.bias``), and the new adapter becomes the active one. Modules named in
    ``config.modules_to_save`` get a trainable copy for this adapter. Returns ``model``.
    Every check runs before the model changes, and a failure while building the adapter (say
    its tensors cannot be allocated) removes what was built: on any error the model is as it was.

    On a model with a ``save_pretrained`` method (a transformers model), that method now writes
    the adapters in PEFT's format, as PEFT's ``PeftModel.save_pretrained`` does (see
    ``minilora.save_pretrained``); ``merge_and_unload`` gives the model's own method back.
    """
    config = (config or LoRAConfig()).replace(**fields) if fields else (config or LoRAConfig())
    check_adapter_name(adapter_name)
    check_not_disabled(model)
    targets = find_targets(model, config)
    if config.use_dora:
        for _, module in targets:
            check_base(module.weight)  # DoRA over a quantized base is refused before any layer changes
    copies = find_modules_to_save(model, config, [n for n, _ in targets]) if config.modules_to_save else []
    known = adapter_names(model)
    if adapter_name in known:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pick another "
                         f"adapter_name or call minilora.delete_adapter(model, {adapter_name!r}) first")
    if any(m.merged for _, m in lora_modules(model)):
        raise ValueError("the model has a merged adapter; call minilora.unmerge(model) before adding another")
    embeddings = [n for n, m in targets if isinstance(m, EMBEDDINGS)]
    if config.use_dora and embeddings:
        raise ValueError(f"use_dora=True: minilora has DoRA for Linear layers only, and target_modules selects the "
                         f"embedding {embeddings[0]!r}; leave it out of target_modules or use plain LoRA")
    variant = {"variant": DoRAAdapter} if config.use_dora else {}  # every target is a Linear then
    replaced = []  # (name, original module): what a failure puts back
    try:
        for name, module in targets:
            if isinstance(module, LORA_LAYERS):
                layer = module
            else:
                layer = replace_module(model, name, LoRAEmbedding(module) if isinstance(module, EMBEDDINGS)
                                       else LoRALinear(module))
                replaced.append((name, module))
            layer.add_adapter(adapter_name, config.rank_for(name), config.alpha_for(name), config.dropout,
                              config.use_rslora, config.init, **variant)
        wrappers = []
        for name, module in copies:
            if isinstance(module, ModuleToSave):
                wrappers.append(module)
            else:
                wrappers.append(replace_module(model, name, ModuleToSave(module)))
                replaced.append((name, module))
        for wrapper in wrappers:
            wrapper.add_adapter(adapter_name)
        tie_copies(wrappers, adapter_name)
    except BaseException as e:
        remove_injected(model, adapter_name, replaced)
        if isinstance(e, (RuntimeError, OverflowError, MemoryError)):  # torch.empty of an absurd rank
            raise ValueError(f"adapter {adapter_name!r} could not be built ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                             f"r={config.r} (rank_pattern={config.rank_pattern}) is too large for this "
                             "machine; the model was left as it was") from None
        raise
    state = adapter_state(model)
    state.layers = None  # new LoRA layers and modules_to_save wrappers may exist now
    state.configs[adapter_name] = config  # how the adapter was made, for saving it in PEFT's format
    set_adapter(model, adapter_name)
    mark_only_lora_trainable(model, bias=config.bias, adapter_name=adapter_name)
    _hook_input_require_grads(model, always=False)
    install(model)
    return model


def check_adapter_name(name) -> None:
    """Raise ValueError unless ``name`` is a plain name: letters, digits, ``_`` and ``-``.

    An adapter name becomes a module name (``adapters.<name>``, so no dots), a key of the
    nn.ModuleDict each layer holds its adapters in (so not one of its attributes: ``forward``,
    ``train``, …), and a folder name (``save_pretrained(dir)`` writes adapter ``x`` into
    ``dir/x``, so no separators: ``/etc/x`` or ``../x`` would be written outside ``dir``)."""
    if not isinstance(name, str) or not re.fullmatch(r"[\w-]+", name):
        raise ValueError(f"adapter_name={name!r}: an adapter name is a plain name of letters, digits, '_' and '-' "
                         "(no dots, slashes or spaces), e.g. 'default' or 'cardiology'")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter_name={name!r} is the name of an attribute of torch's nn.ModuleDict, in which "
                         "each layer holds its adapters; pick another plain name, e.g. 'cardiology'")


def remove_injected(model: nn.Module, adapter_name: str, replaced: list[tuple[str, nn.Module]]) -> None:
    """Undo the module surgery of an inject: drop ``adapter_name`` from every layer and put the
    replaced modules (``(name, module)`` pairs) back."""
    for _, module in adapter_modules(model):
        if adapter_name in module.adapters:
            del module.adapters[adapter_name]
        if module.active_adapter == adapter_name:
            module.active_adapter = None
    for name, linear in replaced:
        replace_module(model, name, linear)
    state = adapter_state(model)
    state.configs.pop(adapter_name, None)
    state.layers = None


def find_targets(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module ``config`` selects; raises if none is, or if one is neither
    an nn.Linear nor (named in target_modules) an nn.Embedding."""
    if config.target_modules == "all-linear":
        head = output_head(model)
        chosen = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, LINEARS) and m is not head and config.selects(n)]
    else:
        chosen = []
        for name, module in model.named_modules():
            if not name or inside_adapters(name) or not config.selects(name):
                continue
            if not isinstance(module, LINEARS + EMBEDDINGS):
                raise ValueError(
                    f"target_modules={config.target_modules!r} matched {name!r}, a "
                    f"{type(module).__name__}; LoRA here replaces nn.Linear and nn.Embedding modules only. "
                    f"Linear module names here end in: {', '.join(linear_name_endings(model))}"
                )
            if isinstance(module, nn.Embedding) and type(module) is not nn.Embedding:
                raise ValueError(f"target_modules={config.target_modules!r} matched {name!r}, a "
                                 f"{type(module).__name__} (a subclass of nn.Embedding whose lookup may differ, "
                                 "e.g. scaled); LoRA here adapts plain nn.Embedding only, so leave it out")
            chosen.append((name, module))
    empty = [(n, w.shape) for n, m in chosen if (w := getattr(m, "weight", None)) is not None
             and math.prod(w.shape) == 0]
    if empty:  # torch's own errors came later, from deep inside (torch.cat of no tiles, a reshape)
        name, shape = empty[0]
        raise UnsupportedLayerError(f"{name!r} has a weight of shape {tuple(shape)}, with no elements: there is "
                                    "nothing to adapt or quantize; leave it out with exclude_modules (or a narrower "
                                    "target_modules)")
    unsupported = [(n, reason) for n, m in chosen if (reason := unsupported_reason(m)) is not None]
    if unsupported:
        name, reason = unsupported[0]
        more = f" (and {len(unsupported) - 1} more such module(s))" if len(unsupported) > 1 else ""
        raise UnsupportedLayerError(
            f"cannot adapt {name!r}: it is {reason}{more}. minilora adapts plain nn.Linear layers, and refuses "
            "others rather than adapt them wrongly; load the base unquantized (minilora.quantize(model, 'nf4') "
            "then gives a 4-bit base that LoRA trains over), or leave such modules out with "
            "exclude_modules / a narrower target_modules")
    if not chosen:
        raise ValueError(
            f"no module matched target_modules={config.target_modules!r}"
            + (f" (exclude_modules={config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r})"
               if config.exclude_modules is not None or config.layers_to_transform is not None else "")
            + (f" outside modules_to_save={config.modules_to_save!r}" if config.modules_to_save else "")
            + f"; Linear module names here end in: {', '.join(linear_name_endings(model)) or '(none)'}"
            + _regex_hint(config.target_modules, model)
        )
    return chosen


def _regex_hint(target_modules, model: nn.Module) -> str:
    """For a string target that matches a name ending but no whole name: say how strings match."""
    if not isinstance(target_modules, str) or target_modules == "all-linear":
        return ""
    if not any(matches(target_modules, ending) for ending in linear_name_endings(model)):
        return ""
    example = next(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear)))
    return (f". A string is a regex that must match the whole module name (such as {example!r}); for name endings "
            f"give a list, e.g. [{target_modules!r}]")


def linear_name_endings(model: nn.Module) -> list[str]:
    """Distinct last name parts of the Linear modules, in model order (for error messages)."""
    endings = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LINEARS)]
    return list(dict.fromkeys(endings))


def output_head(model: nn.Module) -> Optional[nn.Module]:
    """The model's LM head (``get_output_embeddings``, else an ``lm_head`` attribute), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if head is not None else getattr(model, "lm_head", None)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule called ``name`` is (the swap inject, a failed load's
    rollback and merge_and_unload make); returns ``new``. Call ``adapter_state(model).layers =
    None`` after swapping LoRALinear modules in or out."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return new


# -- training only the adapter ----------------------------------------------------------------

def mark_only_lora_trainable(model: nn.Module, bias: str = "none", adapter_name: Optional[str] = None) -> None:
    """Freeze everything except the adapter weights (all adapters, or only ``adapter_name``)
    and the biases that ``bias`` names (none, all, lora_only)."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias={bias!r} is not one of none, all, lora_only")
    known = adapter_names(model)
    if adapter_name is not None and adapter_name not in known:  # it would freeze everything, silently
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has: {', '.join(known) or '(no adapters)'}")
    for param in model.parameters():
        param.requires_grad_(False)
    for _, param in lora_parameters(model, adapter_name):
        param.requires_grad_(True)
    for _, param in bias_parameters(model, bias):
        param.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters count once. A quantized base
    weight (NF4, int8, a GGUF file's blocks) counts as the (out, in) weight it stands for, as
    PEFT counts a 4-bit base: its codes are buffers, yet they are the model's parameters."""
    trainable = total = 0
    for param in model.parameters():  # parameters() already skips tied duplicates
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    stored = {id(m): m for m in model.modules() if isinstance(m, QuantizedWeight)}  # a tied one once
    return trainable, total + sum(m.shape.numel() for m in stored.values())


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's line: ``trainable params: 11,272,192 || all params: 1,247,086,592 || trainable%: 0.9039``."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def enable_input_require_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, so gradients reach the adapters through
    reentrant gradient checkpointing (otherwise: "element 0 of tensors does not require grad",
    or lora_B silently stays zero). ``inject`` installs this automatically whenever the model
    reports ``is_gradient_checkpointing``; call this for other checkpointing schemes."""
    _hook_input_require_grads(model, always=True)


def _hook_input_require_grads(model: nn.Module, always: bool) -> None:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is None:
        return
    state = adapter_state(model)
    state.input_grads_always = state.input_grads_always or always
    if state.input_grads_hook is not None and state.input_grads_module is embeddings:
        return
    if state.input_grads_hook is not None:  # a later inject replaced the embeddings (LoRA or modules_to_save)
        state.input_grads_hook.remove()
    state.input_grads_module = embeddings
    state.input_grads_hook = embeddings.register_forward_hook(_RequireInputGrads(model, state))


class _RequireInputGrads:
    """The forward hook on the input embeddings: their output requires grad while the model
    checkpoints (or always, after enable_input_require_grads). A class rather than a closure so
    that an adapted model pickles (torch.save(model), multiprocessing) as a plain one does; it
    holds the model weakly (no reference cycle of its own) and pickles it, so a copy's hook
    (deepcopy too) asks the copy."""

    def __init__(self, model: nn.Module, state):
        self.model_ref, self.state = weakref.ref(model), state

    def __call__(self, module, inputs, output):
        owner = self.model_ref()
        refuse_peft_on_top(owner)
        # Only a forward that records autograd can need it. Asking the model whether it checkpoints
        # walks every module, one per adapter and layer: with many adapters loaded that walk cost
        # an inference call more than the adapters themselves (docs/benchmarks.md, many adapters).
        if not torch.is_grad_enabled() or output.requires_grad:
            return
        if self.state.input_grads_always or _is_checkpointing(owner):
            output.requires_grad_(True)

    def __reduce__(self):
        return type(self), (self.model_ref(), self.state)


def _is_checkpointing(model) -> bool:
    # transformers >= 5 renamed is_gradient_checkpointing (which now warns) to is_activation_checkpointing.
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False
