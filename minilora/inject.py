"""Module surgery: put LoRALinear in place of the targeted nn.Linear modules."""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from . import batched
from .config import LoRAConfig, inside_adapters, matches
from .dora import DoRAAdapter
from .embedding import LoRAEmbedding
from .layer import _DORA_OVER_QUANTIZED, LoRALinear
from .modules_to_save import ModuleToSave, find_modules_to_save, tie_copies
from .quant import QuantEmbedding, QuantizedBaseError, QuantizedWeight, QuantLinear

# The layers that hold LoRA adapters.
LORA_LAYERS = (LoRALinear, LoRAEmbedding)
# What LoRA adapts as a Linear: nn.Linear, a Linear over a quantized weight (minilora.quantize),
# and LoRALinear layers that already hold another adapter.
LINEARS = (nn.Linear, QuantLinear, LoRALinear)
# What LoRA adapts as an embedding: likewise, plain, quantized (minilora.quantize(..., embeddings=True)) or adapted.
EMBEDDINGS = (nn.Embedding, QuantEmbedding, LoRAEmbedding)


class UnsupportedLayerError(ValueError):
    """A targeted module that LoRALinear cannot stand in for faithfully: a quantized Linear
    (bitsandbytes' Linear4bit/Linear8bitLt: integer weights, their own forward) or any other
    nn.Linear subclass with its own forward. Raised by ``inject`` before the model changes."""


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
    targets = find_targets(model, config)
    if getattr(config, "use_dora", False) and any(isinstance(getattr(m, "weight", None), QuantizedWeight)
                                                  for _, m in targets):
        raise QuantizedBaseError(_DORA_OVER_QUANTIZED)  # before any layer changes
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
    dora = {"use_dora": True} if config.use_dora else {}  # every target is a Linear then
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
                              config.use_rslora, config.init, **dora)
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
    _install_save_pretrained(model)
    return model


def check_adapter_name(name) -> None:
    """Adapter names become module names (``adapters.<name>``): text without dots."""
    if not isinstance(name, str) or not name or "." in name or name.strip() != name:
        raise ValueError(f"adapter_name={name!r}: an adapter name is non-empty text without dots or surrounding "
                         "spaces, e.g. 'default' or 'cardiology'")


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


def _install_save_pretrained(model: nn.Module) -> None:
    """Make this model's ``save_pretrained`` (an instance attribute; the class is untouched) write
    its adapters, so that PEFT's ``model.save_pretrained(dir)`` loses nothing."""
    from .checkpoint import save_pretrained  # checkpoint imports this module

    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in model.__dict__:
        model.save_pretrained = functools.update_wrapper(functools.partial(save_pretrained, model), save_pretrained)


def _remove_save_pretrained(model: nn.Module) -> None:
    """Give the model its class's own ``save_pretrained`` back (after merge_and_unload)."""
    installed = model.__dict__.get("save_pretrained")
    if isinstance(installed, functools.partial) and installed.args[:1] == (model,):
        del model.__dict__["save_pretrained"]


def find_targets(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module ``config`` selects; raises if none is, or if one is neither
    an nn.Linear nor (named in target_modules) an nn.Embedding."""
    if config.target_modules == "all-linear":
        head = _output_head(model)
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


def _output_head(model: nn.Module) -> Optional[nn.Module]:
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


# -- what minilora remembers on a model -----------------------------------------------------------

@dataclass
class AdapterState:
    """What minilora keeps on a model it adapted, beside the modules themselves; one object per
    model (``adapter_state``), never a parameter or buffer, so the state dict is untouched."""

    configs: dict = field(default_factory=dict)  # adapter name -> the LoRAConfig it was made with (for saving)
    layers: Optional[list] = None  # the LoRA layers and ModuleToSave wrappers, cached for set_adapter; None: walk again
    input_grads_always: bool = False  # enable_input_require_grads was called (else only while checkpointing)
    input_grads_hook: Any = None  # the forward-hook handle on the input embeddings
    untied: dict = field(default_factory=dict)  # LoRALinear name -> the weight it shared until merge untied it
    input_grads_module: Any = None  # the embeddings module that hook is on (inject may replace it later)
    bank: Any = None  # the batched.AdapterBank that mixed batches use, made on first use


def adapter_state(model: nn.Module) -> AdapterState:
    """The model's AdapterState, created on first use."""
    state = model.__dict__.get("_minilora")
    if state is None:
        state = model.__dict__["_minilora"] = AdapterState()  # __dict__: not a submodule, not in the state dict
    return state


# -- adapters by name ---------------------------------------------------------------------------

def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every LoRA layer: LoRALinear and LoRAEmbedding."""
    for name, module in model.named_modules():
        if isinstance(module, LORA_LAYERS):
            yield name, module


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module that switches with the adapter: the LoRA layers and the
    modules_to_save copies (ModuleToSave)."""
    for name, module in model.named_modules():
        if isinstance(module, LORA_LAYERS + (ModuleToSave,)):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name present on the model, in the order they were added."""
    names: dict[str, None] = {}
    for _, module in lora_modules(model):
        names.update(dict.fromkeys(module.adapters.keys()))
    return list(names)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the adapter every LoRALinear uses. Only a Python attribute changes: no
    module, parameter or tensor shape does, so a compiled XLA graph is reused. The adapted
    layers are remembered at inject/load time, so a switch walks no module tree."""
    layers = adapted_layers(model)
    known = list(dict.fromkeys(n for m in layers for n in m.adapters))
    if name not in known:
        raise ValueError(f"unknown adapter {name!r}; the model has: {', '.join(known) or '(no adapters)'}")
    merged = {m.merged_adapter for m in layers} - {None}
    if merged and merged != {name}:
        raise ValueError(f"adapter {merged.pop()!r} is merged into the weights; call minilora.unmerge(model) "
                         "before switching adapters")
    for module in layers:
        module.active_adapter = name if name in module.adapters else None


def adapted_layers(model: nn.Module) -> list:
    """The model's LoRA layers and modules_to_save wrappers, cached in its AdapterState (a module
    walk of a 1B Llama costs milliseconds; an adapter switch should not)."""
    state = adapter_state(model)
    if state.layers is None:
        state.layers = [m for _, m in adapter_modules(model)]
    return state.layers


def active_adapter(model: nn.Module) -> Optional[str]:
    """The active adapter's name, or None when no adapter is active."""
    for _, module in lora_modules(model):
        if module.active_adapter is not None:
            return module.active_adapter
    return None


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer; if it was active, no adapter is active after."""
    known = adapter_names(model)
    if name not in known:
        raise ValueError(f"unknown adapter {name!r}; the model has: {', '.join(known) or '(no adapters)'}")
    for _, module in lora_modules(model):
        if module.merged_adapter == name:
            raise ValueError(f"adapter {name!r} is merged; call minilora.unmerge(model) before deleting it")
    for _, module in adapter_modules(model):
        if name in module.adapters:
            del module.adapters[name]
        if module.active_adapter == name:
            module.active_adapter = None
    state = adapter_state(model)
    state.configs.pop(name, None)
    state.layers = None


class disable_adapters:
    """``with disable_adapters(model):`` runs the base model alone (modules_to_save: the original
    modules, not the copies); adapters come back after."""

    def __init__(self, model: nn.Module):
        self.modules = [m for _, m in adapter_modules(model)]
        if any(m.merged for m in self.modules):
            raise ValueError("an adapter is merged into the weights, so the base model is not available; "
                             "call minilora.unmerge(model) first")

    def __enter__(self):
        self.before = [m.disabled for m in self.modules]
        for m in self.modules:
            m.disabled = True
        return self

    def __exit__(self, *exc):
        for m, was in zip(self.modules, self.before):
            m.disabled = was
        return False


class mixed_batch:
    """``with mixed_batch(model, ["cardiology", None, "oncology"]):`` gives each batch row its own
    adapter (``None``: the base model) in one forward pass; modules_to_save copies too: each row runs
    its adapter's copy, or the original module for ``None`` or an adapter without a copy.

    In eval mode the LoRA Linears serve all rows at once from adapters stacked on the device
    (minilora.batched; ``bank``: an AdapterBank of your own, e.g. with a device budget, else the
    model's, made on first use with a slot for every adapter). In training mode, or with gradients
    on for a trainable adapter, each adapter runs over its own rows, with dropout and gradients;
    DoRA adapters are served stacked only."""

    def __init__(self, model: nn.Module, row_adapters, bank=None):
        self.modules = adapted_layers(model)  # cached: a batch of a many-adapter model walks no module tree
        known = list(dict.fromkeys(n for m in self.modules if isinstance(m, LORA_LAYERS) for n in m.adapters))
        unknown = [n for n in row_adapters if n is not None and n not in known]
        if unknown:
            raise ValueError(f"unknown adapter {unknown[0]!r}; the model has: {', '.join(known) or '(no adapters)'}")
        if any(m.merged for m in self.modules):
            raise ValueError("mixed batches need unmerged adapters; call minilora.unmerge(model) first")
        named = set(row_adapters)
        dora = sorted({n for m in self.modules for n, a in m.adapters.items() if n in named
                       and isinstance(a, DoRAAdapter)}) if model.training else []
        if dora:  # DoRA rescales the whole base output: rows pick it only from the stacks
            raise ValueError(f"adapter {dora[0]!r} is a DoRA adapter, which a mixed batch serves in eval mode only "
                             "(model.eval()); to train it, run its rows in a batch of their own with set_adapter")
        self.model, self.rows, self.bank, self.serving = model, list(row_adapters), bank, None

    def __enter__(self):
        if not self.model.training and any(isinstance(m, LoRALinear) for m in self.modules):
            state = adapter_state(self.model)
            linears = [m for m in self.modules if isinstance(m, LoRALinear)]
            state.bank = self.bank or batched.AdapterBank.for_model(self.model, state.bank, linears)
            state.bank.begin(self.rows)
            self.serving = state.bank
        for m in self.modules:
            m.row_adapters = self.rows
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            m.row_adapters = None
        if self.serving is not None:
            self.serving.end()
            self.serving = None
        return False


# -- parameters ---------------------------------------------------------------------------------

def lora_parameters(model: nn.Module, adapter_name: Optional[str] = None) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of the adapter weights: all adapters, or only ``adapter_name``; with
    modules_to_save, every parameter of the adapter's copies (a tied copy once)."""
    seen = set()
    for name, module in adapter_modules(model):
        for key, adapter in module.adapters.items():
            if adapter_name is None or key == adapter_name:
                for param_name, param in adapter.named_parameters(prefix=f"{name}.adapters.{key}"):
                    if id(param) not in seen:
                        seen.add(id(param))
                        yield param_name, param


def bias_parameters(model: nn.Module, bias: str) -> Iterator[tuple[str, nn.Parameter]]:
    """The biases that train (and are saved) with an adapter under PEFT's ``bias`` mode."""
    if bias == "all":
        for name, param in model.named_parameters():
            if (name == "bias" or name.endswith(".bias")) and not inside_adapters(name):  # copies: their own keys
                yield name, param
    elif bias == "lora_only":
        for name, module in lora_modules(model):
            if getattr(module, "bias", None) is not None:
                yield f"{name}.bias", module.bias


def mark_only_lora_trainable(model: nn.Module, bias: str = "none", adapter_name: Optional[str] = None) -> None:
    """Freeze everything except the adapter weights (all adapters, or only ``adapter_name``)
    and the biases that ``bias`` names (none, all, lora_only)."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias={bias!r} is not one of none, all, lora_only")
    for param in model.parameters():
        param.requires_grad_(False)
    for _, param in lora_parameters(model, adapter_name):
        param.requires_grad_(True)
    for _, param in bias_parameters(model, bias):
        param.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters count once."""
    trainable = total = 0
    for param in model.parameters():  # parameters() already skips tied duplicates
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


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
    model_ref = weakref.ref(model)

    def hook(module, inputs, output):
        owner = model_ref()
        wanted = state.input_grads_always or _is_checkpointing(owner)
        if wanted and torch.is_grad_enabled() and not output.requires_grad:
            output.requires_grad_(True)

    state.input_grads_hook = embeddings.register_forward_hook(hook)


def _is_checkpointing(model) -> bool:
    # transformers >= 5 renamed is_gradient_checkpointing (which now warns) to is_activation_checkpointing.
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False
