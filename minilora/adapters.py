"""The adapters a model holds, by name: what minilora remembers on the model, finding its LoRA
layers, switching (set_adapter, disable_adapters, mixed_batch), deleting, and each adapter's
parameters. Nothing here changes which modules the model has: that is minilora.inject's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from torch import nn

from . import batched
from .config import LoRAConfig, inside_adapters
from .dora import DoRAAdapter
from .embedding import LoRAEmbedding
from .layer import LoRALinear
from .modules_to_save import ModuleToSave

# The layers that hold LoRA adapters.
LORA_LAYERS = (LoRALinear, LoRAEmbedding)


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
    disabled_blocks: int = 0  # `with disable_adapters(model):` blocks open now (inject refuses inside one)
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
    """The model's LoRA layers and modules_to_save wrappers, cached in its AdapterState, so that
    an adapter switch sets attributes and walks no module tree (a Llama has hundreds of modules)."""
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
    modules, not the copies); adapters come back after. Blocks nest, also of one object entered
    again. Inside one, adding an adapter (inject, load_adapter) or merging is refused: either would
    make the block run adapted."""

    def __init__(self, model: nn.Module):
        self.state = adapter_state(model)
        self.modules = [m for _, m in adapter_modules(model)]
        if any(m.merged for m in self.modules):
            raise ValueError("an adapter is merged into the weights, so the base model is not available; "
                             "call minilora.unmerge(model) first")
        self.saved = []  # the flags each open entry found, innermost last

    def __enter__(self):
        self.saved.append([m.disabled for m in self.modules])
        self.state.disabled_blocks += 1
        for m in self.modules:
            m.disabled = True
        return self

    def __exit__(self, *exc):
        for m, was in zip(self.modules, self.saved.pop()):
            m.disabled = was
        self.state.disabled_blocks -= 1
        return False


def check_not_disabled(model: nn.Module) -> None:
    """Raise ValueError inside ``with disable_adapters(model):``, where a new adapter would be
    active although the block promises the base model."""
    if adapter_state(model).disabled_blocks:
        raise ValueError("adapters are disabled here (inside `with minilora.disable_adapters(model):`), which "
                         "promises the base model, but a new adapter would be active in it; add it after the block")


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


def config_of(model: nn.Module, adapter_name: str) -> LoRAConfig:
    """The LoRAConfig adapter ``adapter_name`` was made with (saving writes it to adapter_config.json)."""
    configs = adapter_state(model).configs
    if adapter_name in configs:
        return configs[adapter_name]
    raise ValueError(f"no LoRAConfig recorded for adapter {adapter_name!r}; adapters added with "
                     "minilora.inject or minilora.load_adapter carry one")
