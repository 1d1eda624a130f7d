"""Writing adapters in PEFT's on-disk format (safetensors only); minilora.checkpoint reads them.

On disk, as PEFT writes it:
    adapter_model.safetensors  keys ``base_model.model.<module path>.lora_A.weight`` (r, in)
                               and ``...lora_B.weight`` (out, r); ``...lora_embedding_A`` (r, vocab)
                               and ``...lora_embedding_B`` (dim, r) for embeddings; a
                               modules_to_save copy under the module's own keys
                               (``...lm_head.weight``); DoRA's ``...lora_magnitude_vector`` (out,);
                               no adapter name in keys
    adapter_config.json        ``peft_type: "LORA"``, r, lora_alpha, target_modules, …

``save_pretrained`` is what ``model.save_pretrained(dir)`` runs once inject has installed it.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters import adapter_modules, adapter_names, bias_parameters, config_of, lora_modules
from .dora import DoRAAdapter
from .layer import LoRALinear
from .weight import QuantizedBaseError, is_quantized

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (plus biases per the adapter's ``bias``, and
    its modules_to_save copies under the modules' own keys)."""
    if adapter_name not in adapter_names(model):
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has: {', '.join(adapter_names(model)) or '(no adapters)'}")
    state = {}
    for name, module in adapter_modules(model):
        if adapter_name in module.adapters and isinstance(module, LoRALinear):
            adapter = module.adapters[adapter_name]
            state[f"{PREFIX}{name}.lora_A.weight"] = adapter.lora_A
            state[f"{PREFIX}{name}.lora_B.weight"] = adapter.lora_B
            if isinstance(adapter, DoRAAdapter):  # PEFT's key: no ".weight" suffix
                state[f"{PREFIX}{name}.lora_magnitude_vector"] = adapter.lora_magnitude_vector
        elif adapter_name in module.adapters:  # LoRAEmbedding, ModuleToSave
            state.update((f"{PREFIX}{name}.{key}", t) for key, t in module.peft_tensors(adapter_name).items())
    # PEFT keeps an adapted Linear's bias on its wrapped ``base_layer``, so that is the key it
    # writes and expects; biases of other modules keep their own names.
    adapted = {name for name, _ in lora_modules(model)}
    for name, param in bias_parameters(model, config_of(model, adapter_name).bias):
        owner = name.rpartition(".")[0]
        state[f"{PREFIX}{owner}.base_layer.bias" if owner in adapted else f"{PREFIX}{name}"] = param
    return state


def peft_config(model: nn.Module, adapter_name: str = "default",
                base_model_name_or_path: Optional[str] = None) -> dict:
    """The adapter's settings as PEFT's ``adapter_config.json`` holds them."""
    config = config_of(model, adapter_name)
    targets = config.target_modules
    if targets == "all-linear":  # as PEFT does: the full names of the modules it resolved to
        targets = sorted(n for n, m in lora_modules(model) if adapter_name in m.adapters and isinstance(m, LoRALinear))
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "exclude_modules": config.exclude_modules,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": None,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "fan_in_fan_out": False,
        "use_dora": config.use_dora,
        "modules_to_save": None if config.modules_to_save is None else list(config.modules_to_save),
        "ensure_weight_tying": config.ensure_weight_tying,
        "layer_replication": None,
        "lora_bias": False,
    }


def save_adapter(model: nn.Module, path: str, adapter_name: str = "default",
                 base_model_name_or_path: Optional[str] = None, *,
                 state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into directory ``path``.

    ``state_dict``: the model's full state dict to take the adapter's tensors from instead of the
    live parameters (what transformers' Trainer passes to save_pretrained, gathered under FSDP or
    DeepSpeed). Each file is written under a temporary name and renamed into place when complete,
    the config last, so a crash never leaves a config that points at half-written weights.
    """
    state = lora_state_dict(model, adapter_name)
    state = host_tensors(state if state_dict is None else taken_from(model, state, state_dict))
    config = peft_config(model, adapter_name, base_model_name_or_path)
    os.makedirs(path, exist_ok=True)
    _write_aside(os.path.join(path, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _write_aside(os.path.join(path, CONFIG_NAME), lambda tmp: _write_json(config, tmp))


def _write_aside(final: str, write) -> None:
    """``write(tmp)`` a file under a name of its own, then rename it to ``final``: a crash leaves no
    half-written ``final``, and two processes saving into one folder at once never share a
    temporary file (with one name for all, one renamed the other's away: FileNotFoundError)."""
    tmp = f"{final}.tmp-{uuid.uuid4().hex}"
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_json(config: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def taken_from(model: nn.Module, adapter_state: dict[str, torch.Tensor],
                full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``adapter_state``'s keys, each with the tensor that ``full`` (a state dict of the model)
    holds for the same parameter or buffer; FSDP's wrapper prefixes are ignored on both sides."""
    def plain(name: str) -> str:
        return name.replace("_fsdp_wrapped_module.", "")

    full = {plain(k): v for k, v in full.items()}
    names: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(plain(name))
    taken = {}
    for key, tensor in adapter_state.items():
        found = [n for n in names.get(id(tensor), []) if n in full]
        if not found:
            raise ValueError(f"the state_dict passed has no entry for {key} (the model's name for it: "
                             f"{names.get(id(tensor), ['?'])[0]}); pass the model's own state_dict(), or none")
        taken[key] = full[found[0]]
    return taken


def host_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU tensors for safetensors, which refuses two keys on one storage: a tensor held
    under two keys (tied modules_to_save copies) is cloned for its second key."""
    seen, out = set(), {}
    for key, tensor in state.items():
        host = tensor.detach().to("cpu").contiguous()
        out[key] = host.clone() if id(tensor) in seen else host
        seen.add(id(tensor))
    return out


# PeftModel.save_pretrained's parameters that mean something here, in its order.
_SAVE_PRETRAINED_OPTIONS = ("safe_serialization", "selected_adapters", "save_embedding_layers", "is_main_process",
                            "state_dict")


def save_pretrained(model: nn.Module, save_directory: str, safe_serialization: bool = True,
                    selected_adapters: Optional[list[str]] = None, save_embedding_layers="auto",
                    is_main_process: bool = True, state_dict: Optional[dict[str, torch.Tensor]] = None,
                    **unsupported) -> None:
    """What ``model.save_pretrained(dir)`` does once ``minilora.inject`` has run: write the
    adapters in PEFT's format, as PEFT's ``PeftModel.save_pretrained`` does: the adapter named
    "default" into ``save_directory`` itself, any other adapter into ``save_directory/<name>``,
    each as adapter_model.safetensors + adapter_config.json (save_adapter). Reload with
    ``minilora.load_adapter(base, dir)`` or ``PeftModel.from_pretrained(base, dir)``.
    ``state_dict`` (the model's full state dict, as transformers' Trainer passes it) is where the
    adapter tensors are taken from when given, as PEFT does.

    The base weights are not written (the adapter folder names its base in
    base_model_name_or_path); ``minilora.merge_and_unload(model).save_pretrained(dir)`` writes
    a whole merged model instead. ``safe_serialization=False`` (a pickle file) and options of
    transformers' own save_pretrained (push_to_hub, max_shard_size, …) are refused.
    """
    names = adapter_names(model)
    if not names:  # no adapter (every one deleted, or installed by minilora.quantize): the model is a base
        quantized = next((name for name, m in model.named_modules()  # a stored weight is a module of buffers
                          if m._modules.get("weight") is not None and is_quantized(m._modules["weight"])), None)
        if quantized is not None:
            raise QuantizedBaseError(
                f"the model's weights are stored quantized ({quantized}.weight …), and transformers' save_pretrained "
                "would write codes that from_pretrained does not read: it would initialise every quantized layer at "
                "random. Call minilora.dequantize(model) first for a plain checkpoint, or save an adapter instead")
        return type(model).save_pretrained(model, save_directory, safe_serialization=safe_serialization,
                                           is_main_process=is_main_process, state_dict=state_dict, **unsupported)
    if unsupported:
        raise TypeError(f"save_pretrained after minilora.inject writes the adapters only and takes "
                        f"{', '.join(_SAVE_PRETRAINED_OPTIONS)}; not {', '.join(sorted(unsupported))}. To save the "
                        "whole model with transformers' options, call minilora.merge_and_unload(model) first")
    if not safe_serialization:
        raise ValueError(f"safe_serialization=False would write {PICKLE_NAME}, a pickle file; minilora writes "
                         f"{WEIGHTS_NAME} only, which PEFT and minilora both load: leave safe_serialization=True")
    if save_embedding_layers is True:
        raise ValueError("save_embedding_layers=True: minilora does not write base embedding weights; to train "
                         "embed_tokens or lm_head in full, name them in modules_to_save")
    selected = names if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in selected if n not in names]
    if unknown:
        raise ValueError(f"selected_adapters: unknown adapter(s) {', '.join(map(repr, unknown))}; "
                         f"the model has: {', '.join(names)}")
    if not is_main_process:
        return
    for name in selected:
        save_adapter(model, save_directory if name == "default" else os.path.join(save_directory, name), name,
                     state_dict=state_dict)
