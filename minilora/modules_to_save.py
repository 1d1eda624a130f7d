"""modules_to_save: modules trained in full, one trainable copy per adapter (PEFT's feature).

A ModuleToSave stands where the named module was. It registers the module's own Parameters and
buffers under their own names (the same objects, so ``lm_head.weight`` stays ``lm_head.weight`` and
transformers' weight tying still finds it) and holds a full copy per adapter in ``adapters``.
Forward runs the active adapter's copy, or the module itself when no adapter with a copy is
active or adapters are disabled; in a mixed batch each row runs its own adapter's copy.

On disk, as PEFT writes it: the copy's tensors under the module's own keys,
``base_model.model.lm_head.weight``, with no ``modules_to_save.<adapter>`` in them.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from .config import LoRAConfig, inside_adapters, matches
from .embedding import LoRAEmbedding
from .layer import LoRALinear, rows_by_adapter
from .weight import QuantizedBaseError, QuantizedWeight


class ModuleToSave(nn.Module):
    """Replaces a module named in ``modules_to_save``; call it as the module itself.

    Attributes:
        original: the module it replaced (frozen; run when no adapter copy applies).
        adapters: adapter name -> that adapter's trainable copy of ``original``.
    """

    merged_adapter = None  # nothing to merge: a copy is used as it is (the adapter protocol's fields)
    merged = False

    def __init__(self, module: nn.Module):
        super().__init__()
        # Not registered as a child (its tensors would move under "original."); its parameter and
        # buffer dicts are shared instead, so the keys and objects stay what they were.
        object.__setattr__(self, "original", module)
        self._parameters = module._parameters
        self._buffers = module._buffers
        self._non_persistent_buffers_set = module._non_persistent_buffers_set
        self.adapters = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disabled = False
        self.row_adapters: Optional[Sequence[Optional[str]]] = None
        self.train(module.training)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, adapters
        except AttributeError:
            original = self.__dict__.get("original")
            if original is None:
                raise
            # The module's own attributes (num_embeddings, in_features, …), which callers such as
            # transformers read from get_input_embeddings() / get_output_embeddings().
            return getattr(original, name)

    def train(self, mode: bool = True) -> "ModuleToSave":
        self.original.train(mode)  # not a child, so nn.Module.train would not reach it
        return super().train(mode)

    def add_adapter(self, name: str) -> nn.Module:
        if name in self.adapters:
            raise ValueError(f"this module already has a copy for adapter {name!r}")
        self.adapters[name] = copy.deepcopy(self.original)
        return self.adapters[name]

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s copy under the module's own key endings (``weight``, ``bias``, …)."""
        return dict(self.adapters[name].state_dict(keep_vars=True))

    def module_for(self, name: Optional[str]) -> nn.Module:
        return self.adapters[name] if name is not None and name in self.adapters else self.original

    def forward(self, x, *args, **kwargs):
        if self.row_adapters is None:
            return self.module_for(None if self.disabled else self.active_adapter)(x, *args, **kwargs)
        out = None
        for name, rows in rows_by_adapter(self.row_adapters, x.shape[0], x.device):
            part = self.module_for(name)(x.index_select(0, rows), *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        return out

    def unload(self) -> nn.Module:
        """The module to put back for good: the active adapter's copy, or the original."""
        return self.module_for(self.active_adapter).train(self.training)

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__}, copies={list(self.adapters)}, active={self.active_adapter!r}"


def find_modules_to_save(model: nn.Module, config: LoRAConfig, lora_targets: Sequence[str] = ()
                         ) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that holds parameters itself at or below a module that
    ``config.modules_to_save`` names (PEFT's keys are the same either way: ``classifier`` and
    ``classifier.dense`` both save ``classifier.dense.weight``). With ``ensure_weight_tying``, the
    modules tied to a chosen one are added. Raises ValueError when nothing matches or a module
    is also a LoRA target."""
    named = [n for n, m in model.named_modules() if n and matches(config.modules_to_save, n)
             and not inside_adapters(n)]
    if not named:
        endings = dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                if n and next(m.parameters(recurse=False), None) is not None)
        raise ValueError(f"no module matched modules_to_save={config.modules_to_save!r}; modules holding "
                         f"parameters here end in: {', '.join(endings)}")
    chosen: dict[str, nn.Module] = {}
    for top in named:
        for sub, module in model.get_submodule(top).named_modules(prefix=top):
            if not isinstance(module, ModuleToSave) and inside_adapters(sub):
                continue
            if isinstance(module, QuantizedWeight):
                # A copy would be codes, which do not train: refuse rather than save nothing.
                raise QuantizedBaseError(
                    f"modules_to_save={config.modules_to_save!r} names {top!r}, whose weight "
                    f"{sub} is stored quantized ({module.scheme}), and a quantized module cannot be trained in full; "
                    "quantize without it (exclude_modules, or without embeddings=True for an embedding or a head tied "
                    "to it), or adapt it with LoRA through target_modules")
            if isinstance(module, ModuleToSave) or module._parameters:
                chosen[sub] = module
    tied = tied_modules(model, chosen)
    if config.ensure_weight_tying:
        chosen.update((name, module) for name, module in tied.items() if name not in chosen)
    for name, module in chosen.items():
        if name in lora_targets or isinstance(module, (LoRALinear, LoRAEmbedding)):
            raise ValueError(f"{name!r} is both a LoRA target and in modules_to_save={config.modules_to_save!r}"
                             + (" (through its tied weights)" if name in tied else "") + "; a module is either "
                             "adapted with LoRA or trained in full, so name it in one of them")
        if not isinstance(module, ModuleToSave) and next(module.children(), None) is not None:
            # The wrapper shares the module's own parameters and buffers, not its children's.
            raise ValueError(f"modules_to_save: {name!r} ({type(module).__name__}) holds parameters and has "
                             "submodules; name its submodules instead")
    if tied and not config.ensure_weight_tying:
        warnings.warn(f"{', '.join(tied)} share weights in the base model; modules_to_save gives each named module "
                      "its own copy, so in the adapted model they are no longer tied "
                      "(ensure_weight_tying=True keeps one shared copy)", stacklevel=3)
    return list(chosen.items())


def tied_modules(model: nn.Module, chosen: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Every module that shares a Parameter object with another module where one of the two is in
    ``chosen`` (lm_head and embed_tokens in a model with tied word embeddings); {} if none."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, ModuleToSave) or not inside_adapters(name):
            for param in module._parameters.values():
                if param is not None:
                    owners.setdefault(id(param), []).append((name, module))
    tied = {}
    for group in owners.values():
        if len(group) > 1 and any(name in chosen for name, _ in group):
            tied.update(group)
    return tied


def tie_copies(wrappers: Sequence[ModuleToSave], adapter_name: str) -> None:
    """Where the originals share a Parameter, make adapter ``adapter_name``'s copies share one too
    (the first wrapper's copy provides it)."""
    for i, first in enumerate(wrappers):
        for second in wrappers[i + 1:]:
            first_copy, second_copy = first.adapters[adapter_name], second.adapters[adapter_name]
            for key, param in second.original._parameters.items():
                for first_key, first_param in first.original._parameters.items():
                    if param is not None and param is first_param:
                        second_copy._parameters[key] = first_copy._parameters[first_key]
