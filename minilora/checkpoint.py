"""Loading adapters saved in PEFT's on-disk format (minilora/save.py writes them and describes the
files): strict, checked before anything is built, and leaving the model as it was on any failure.
Only safetensors are read.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Mapping, NamedTuple, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .adapters import active_adapter, adapter_names, adapter_state, check_not_disabled, lora_modules, set_adapter
from .config import BIAS_MODES, TASK_TYPES, LoRAConfig
from .embedding import LoRAEmbedding
from .inject import check_adapter_name, find_targets, inject, remove_injected, replace_module
from .save import CONFIG_NAME, PICKLE_NAME, PREFIX, WEIGHTS_NAME, lora_state_dict
from .trainers import uninstall

# PEFT LoraConfig fields that carry no meaning for the LoRA minilora computes (read and ignored).
_IGNORED_FIELDS = {
    "peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "layers_pattern", "loftq_config", "megatron_config", "megatron_core", "peft_version", "runtime_config",
    "eva_config", "corda_config", "lora_ga_config", "velora_config", "use_qalora", "qalora_group_size",
    "init_lora_weights",
}
# Fields whose non-default values change the computation in ways minilora does not implement.
_UNSUPPORTED = {
    "fan_in_fan_out": (False, None), "lora_bias": (False, None),
    "layer_replication": (None, []), "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []), "alora_invocation_tokens": (None, []), "arrow_config": (None,),
    "kasa_config": (None,), "monteclora_config": (None,), "use_bdlora": (None, False),
}
# init_lora_weights values whose initialisation rewrote the base weights: such an adapter only
# fits the rewritten base, not the original one.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


class AdapterLoadError(ValueError):
    """An adapter could not be loaded faithfully; nothing on the model was changed."""


def load_adapter(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False) -> nn.Module:
    """Load a PEFT-format LoRA adapter from directory ``path`` into ``model`` (in place) and make
    it the active adapter.

    The config is checked against the file's tensors and the model before any layer is built
    (``validate_adapter``); then LoRA layers are injected per the saved config and the weights
    copied strictly. Any failure (a missing, unexpected or mis-shaped key, a non-finite weight,
    a layer minilora cannot adapt) raises AdapterLoadError naming it and leaves the model as it
    was. Only safetensors are read; pickle files are refused, since unpickling runs code.
    """
    config, base_name = read_adapter_config(path)
    # Names, dtypes and shapes from the file's header first: a header may claim a 12 GB tensor.
    validate_adapter(model, config, _read_header(path), path, base_name, adapter_name)
    state = _read_weights(path)
    _check_finite(state, os.path.join(path, WEIGHTS_NAME))
    previous = active_adapter(model)
    # What inject changes, so a load that fails can put it back: the modules it replaces (LoRA
    # layers, modules_to_save wrappers) and the requires_grad flags (it freezes all but the adapter).
    modules = list(model.named_modules())
    trainable = {param: param.requires_grad for param in model.parameters()}
    try:
        inject(model, config, adapter_name=adapter_name)
    except ValueError as e:  # inject has undone itself (say, modules_to_save matching nothing)
        raise AdapterLoadError(f"the adapter at {path} does not fit this model: {e}") from None
    try:
        _copy_strict(model, state, adapter_name, path, base_name)
    except BaseException:  # anything, an interrupt included: the model goes back to what it was
        remove_injected(model, adapter_name, [])
        for name, module in modules:  # parents come first, so a restored parent's children resolve again
            if name and model.get_submodule(name) is not module:
                replace_module(model, name, module)
        adapter_state(model).layers = None
        if not adapter_names(model):
            uninstall(model)
        for param, flag in trainable.items():
            param.requires_grad_(flag)
        if previous is not None:
            set_adapter(model, previous)
        raise
    if not is_trainable:
        for param in model.parameters():
            param.requires_grad_(False)
    return model


class Stored(NamedTuple):
    """A tensor as a safetensors header describes it, before any of its bytes are read."""

    shape: tuple
    dtype: Union[torch.dtype, str]  # safetensors' own name (e.g. "F8_E8M0") where torch has none


# safetensors' dtype names, as the header spells them.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def validate_adapter(model: nn.Module, config: LoRAConfig, state: Mapping[str, Union[torch.Tensor, Stored]],
                     path: str, base_name: Optional[str] = None, adapter_name: str = "default") -> None:
    """Check a saved adapter against ``model`` before anything is built; AdapterLoadError if not.

    ``state`` holds the file's tensors, or (as load_adapter passes it, before reading a byte of
    them) their header entries. Every tensor must be floating-point (and, given tensors, finite);
    every module the config targets must be one minilora can adapt and have ``lora_A`` (r, in)
    and ``lora_B`` (out, r) (DoRA: ``lora_magnitude_vector`` (out,)) in the file with the rank the
    config gives it; and every other tensor must have the shape of the model's tensor it names
    (a modules_to_save copy, a bias, an embedding's rows). So neither a config claiming
    ``r: 5000000`` beside a small file nor a header claiming a 12 GB tensor costs memory. (Which
    of those other keys the adapter really has is checked by the strict copy after injection.)
    """
    try:
        check_adapter_name(adapter_name)
        check_not_disabled(model)
    except ValueError as e:
        raise AdapterLoadError(str(e)) from None
    if adapter_name in adapter_names(model):
        raise AdapterLoadError(f"the model already has an adapter named {adapter_name!r}; "
                               "load under another adapter_name or delete that adapter first")
    where = os.path.join(path, WEIGHTS_NAME)
    _check_dtypes(state, where)
    _check_finite({k: t for k, t in state.items() if isinstance(t, torch.Tensor)}, where)
    trained_on = f" (it was trained on {base_name})" if base_name else ""
    try:
        targets = find_targets(model, config)
    except ValueError as e:
        raise AdapterLoadError(f"the adapter at {path} does not fit this model{trained_on}: {e}") from None
    expected = {}
    for name, module in targets:
        r = config.rank_for(name)
        if isinstance(module, (nn.Embedding, LoRAEmbedding)):  # PEFT's names: lora_embedding_A (r, vocab), _B (dim, r)
            expected[f"{PREFIX}{name}.lora_embedding_A"] = (r, module.num_embeddings)
            expected[f"{PREFIX}{name}.lora_embedding_B"] = (module.embedding_dim, r)
        else:
            expected[f"{PREFIX}{name}.lora_A.weight"] = (r, module.in_features)
            expected[f"{PREFIX}{name}.lora_B.weight"] = (module.out_features, r)
            if config.use_dora:
                expected[f"{PREFIX}{name}.lora_magnitude_vector"] = (module.out_features,)
    # Any other key names a tensor of the model (PEFT keeps an adapted layer's own tensors under
    # its "base_layer"), whose shape bounds it; a key naming none cannot belong to this adapter.
    model_shapes = {f"{PREFIX}{n}": tuple(t.shape) for n, t in
                    [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
    for key in set(state) - set(expected):
        named = model_shapes.get(key.replace(".base_layer.", "."))
        if named is not None:
            expected[key] = named
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [(k, tuple(state[k].shape), expected[k]) for k in sorted(set(expected) & set(state))
                  if tuple(state[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        raise AdapterLoadError(_misfit(model, path, base_name, missing, unexpected, mismatched))


def _check_dtypes(state: Mapping[str, Union[torch.Tensor, Stored]], where: str) -> None:
    """Every tensor (or header entry) floating-point: integer codes are no adapter's weights."""
    for key, tensor in state.items():
        if not (isinstance(tensor.dtype, torch.dtype) and tensor.dtype.is_floating_point):
            raise AdapterLoadError(f"{where}: {key} holds {tensor.dtype} values; adapter weights are floating-point")


def _check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor finite: a NaN in lora_B would pass every shape check and turn every output of
    the adapted model into NaN (or, merged, the base weights themselves)."""
    _check_dtypes(state, where)
    for key, tensor in state.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise AdapterLoadError(f"{where}: {key} holds {bad} non-finite value(s) (NaN or inf) of {tensor.numel()}; "
                                   "the adapter diverged in training and would make the model's output NaN. Use "
                                   "an earlier checkpoint of that training run")


def load_adapter_weights(model: nn.Module, path: str, adapter_name: str = "default") -> None:
    """Copy the adapter weights saved at ``path`` into the model's existing adapter
    ``adapter_name`` (continuing training from a checkpoint). As strict as load_adapter: a
    missing, unexpected, mis-shaped or non-finite tensor raises AdapterLoadError naming it,
    before anything is copied; only safetensors are read."""
    _, base_name = read_adapter_config(path)
    _check_fit(model, _read_header(path), adapter_name, path, base_name)  # before a byte is read
    state = _read_weights(path)
    _check_finite(state, os.path.join(path, WEIGHTS_NAME))
    _copy_strict(model, state, adapter_name, path, base_name)


def read_adapter_config(path: str) -> tuple[LoRAConfig, Optional[str]]:
    """(LoRAConfig, base_model_name_or_path) from ``path/adapter_config.json``; checks types and
    ranges, warns about fields it does not know, refuses features it does not implement."""
    if not os.path.isdir(path):
        raise AdapterLoadError(f"no adapter directory at {path!r} (expected a folder holding "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        _refuse_broken_link(config_path)
        raise AdapterLoadError(f"{path!r} has no {CONFIG_NAME}; an adapter folder holds {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME} (found: {', '.join(sorted(os.listdir(path))) or 'nothing'})")
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterLoadError(f"{config_path} is not valid JSON: {e}") from None
    except RecursionError:  # json's decoder recurses once per level of nesting
        raise AdapterLoadError(f"{config_path} nests JSON too deeply to read; a PEFT adapter_config.json is a "
                               "flat object of settings") from None
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{config_path} must hold a JSON object, found {type(raw).__name__}")
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"{config_path}: peft_type is {raw.get('peft_type')!r}; only LORA adapters load here")
    for key, allowed in _UNSUPPORTED.items():
        if key in raw and raw[key] not in allowed:
            raise AdapterLoadError(f"{config_path}: {key}={raw[key]!r} is not supported by minilora "
                                   "(LoRA on nn.Linear and nn.Embedding, and modules_to_save)")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterLoadError(f"{config_path}: init_lora_weights={init!r} rewrote the base weights during "
                               "training, so the adapter does not fit the original base; convert it to plain "
                               "LoRA first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    known = _IGNORED_FIELDS | set(_UNSUPPORTED) | {
        "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform", "bias",
        "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "ensure_weight_tying", "task_type"}
    unknown = sorted(set(raw) - known)
    if unknown:
        warnings.warn(f"{config_path}: ignoring fields minilora does not know (from a newer PEFT?): "
                      f"{', '.join(unknown)}", stacklevel=3)
    fields = {
        "r": _typed(raw, "r", int, 8, config_path),
        "alpha": _typed(raw, "lora_alpha", (int, float), 8, config_path),
        "dropout": _typed(raw, "lora_dropout", (int, float), 0.0, config_path),
        "target_modules": _typed(raw, "target_modules", (list, str), None, config_path),
        "exclude_modules": _typed(raw, "exclude_modules", (list, str, type(None)), None, config_path),
        "layers_to_transform": _typed(raw, "layers_to_transform", (list, int, type(None)), None, config_path),
        "bias": _typed(raw, "bias", str, "none", config_path),
        "use_rslora": _typed(raw, "use_rslora", bool, False, config_path),
        "use_dora": _typed(raw, "use_dora", (bool, type(None)), False, config_path) or False,
        "rank_pattern": _typed(raw, "rank_pattern", (dict, type(None)), {}, config_path) or {},
        "alpha_pattern": _typed(raw, "alpha_pattern", (dict, type(None)), {}, config_path) or {},
        "init": "gaussian" if raw.get("init_lora_weights") == "gaussian" else "kaiming",
        "modules_to_save": _typed(raw, "modules_to_save", (list, type(None)), None, config_path) or None,
        "ensure_weight_tying": _typed(raw, "ensure_weight_tying", bool, False, config_path),
        "task_type": _typed(raw, "task_type", (str, type(None)), None, config_path),
    }
    if fields["task_type"] not in (None, *TASK_TYPES):  # a label for PEFT's model class, not for the weights
        warnings.warn(f"{config_path}: task_type={fields['task_type']!r} is not one minilora knows "
                      f"({', '.join(TASK_TYPES)}); the adapter loads without it", stacklevel=2)
        fields["task_type"] = None
    if fields["target_modules"] is None:
        raise AdapterLoadError(f"{config_path} has no target_modules; it cannot say which layers it adapts")
    if fields["bias"] not in BIAS_MODES:
        raise AdapterLoadError(f"{config_path}: bias={fields['bias']!r} is not one of {', '.join(BIAS_MODES)}")
    try:
        config = LoRAConfig(**fields)
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"{config_path}: {e}") from None
    base = raw.get("base_model_name_or_path")
    return config, base if isinstance(base, str) else None


def _typed(raw: dict, key: str, types, default, where: str):
    value = raw.get(key, default)
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise AdapterLoadError(f"{where}: {key}={value!r} has the wrong type")
    if not isinstance(value, types) and value is not default:
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise AdapterLoadError(f"{where}: {key}={value!r} should be {names}")
    return value


def _refuse_broken_link(path: str) -> None:
    if os.path.islink(path):
        raise AdapterLoadError(f"{path} is a symbolic link to {os.readlink(path)!r}, which does not exist (a moved "
                               "or deleted file); copy the real file there or fix the link")


def _read_header(path: str) -> dict[str, Stored]:
    """The name, dtype and shape of every tensor in ``path``'s weights file, from its header alone
    (safe_open reads no tensor data until asked)."""
    weights = _weights_file(path)
    try:
        with safe_open(weights, framework="pt") as f:
            header = {}
            for key in f.keys():
                entry = f.get_slice(key)
                header[key] = Stored(tuple(entry.get_shape()), _DTYPES.get(entry.get_dtype(), entry.get_dtype()))
            return header
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise AdapterLoadError(f"{weights} is truncated or corrupted and cannot be read: {e}") from None


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor in ``path``'s weights file: call it once the header has been checked."""
    weights = _weights_file(path)
    try:
        return load_file(weights)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise AdapterLoadError(f"{weights} is truncated or corrupted and cannot be read: {e}") from None


def _weights_file(path: str) -> str:
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, PICKLE_NAME)):
            raise AdapterLoadError(
                f"{path!r} holds only {PICKLE_NAME}, a pickle file; loading pickle can execute arbitrary code, so "
                f"minilora reads safetensors only. Re-save it as {WEIGHTS_NAME} from a trusted environment "
                "(PEFT: save_pretrained(..., safe_serialization=True))"
            )
        _refuse_broken_link(weights)
        raise AdapterLoadError(f"{path!r} has no {WEIGHTS_NAME} (found: {', '.join(sorted(os.listdir(path)))})")
    return weights


def _copy_strict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str, path: str,
                 base_name: Optional[str]) -> None:
    expected = _check_fit(model, state, adapter_name, path, base_name)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key].to(dtype=target.dtype, device=target.device))


def _check_fit(model: nn.Module, state: Mapping[str, Union[torch.Tensor, Stored]], adapter_name: str, path: str,
               base_name: Optional[str]) -> dict[str, torch.Tensor]:
    """Raise AdapterLoadError unless ``state`` (tensors or header entries) has exactly the keys and
    shapes of the model's adapter ``adapter_name``; returns the model's tensors by file key."""
    expected = lora_state_dict(model, adapter_name)
    # PEFT also writes the base weights of a LoRA-adapted embedding (save_embedding_layers="auto"),
    # and loads them into the base: they carry rows of tokens added by resizing the vocabulary.
    expected.update((f"{PREFIX}{name}.base_layer.weight", m.weight) for name, m in lora_modules(model)
                    if isinstance(m, LoRAEmbedding) and adapter_name in m.adapters
                    and f"{PREFIX}{name}.base_layer.weight" in state)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [(k, tuple(state[k].shape), tuple(expected[k].shape))
                  for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise AdapterLoadError(_misfit(model, path, base_name, missing, unexpected, mismatched))
    return expected


def _misfit(model: nn.Module, path: str, base_name: Optional[str], missing: list, unexpected: list,
            mismatched: list) -> str:
    """The message for an adapter whose keys or shapes do not fit the model, up to 10 of each."""
    lines = [f"the adapter at {path} does not fit this model" + (f" (it was trained on {base_name})" if base_name else "") + ":"]
    lines += [f"  shape mismatch {k}: file {f} vs model {m}" for k, f, m in mismatched[:10]]
    lines += [f"  missing from file: {k}" for k in missing[:10]]
    lines += [f"  unexpected in file: {k}" for k in unexpected[:10]]
    hidden = max(0, len(mismatched) - 10) + max(0, len(missing) - 10) + max(0, len(unexpected) - 10)
    if hidden:
        lines.append(f"  … and {hidden} more")
    lines += _resized_vocabulary_hint(model, mismatched)
    return "\n".join(lines)


def _resized_vocabulary_hint(model: nn.Module, mismatched: list[tuple[str, tuple, tuple]]) -> list[str]:
    """A line for the usual cause of embedding-sized mismatches (modules_to_save embed_tokens /
    lm_head, LoRA on embeddings): the adapter was trained after adding tokens to the vocabulary."""
    get = getattr(model, "get_input_embeddings", None)
    vocab = getattr(get(), "num_embeddings", None) if callable(get) else None
    sizes = sorted({f[d] for _, f, m in mismatched if len(f) == len(m)
                    for d in range(len(m)) if m[d] == vocab and f[d] != vocab})
    if vocab is None or not sizes:
        return []
    return [f"  the file's vocabulary has {sizes[0]} tokens and this model's {vocab}: resize the base's token "
            f"embeddings first (transformers: model.resize_token_embeddings({sizes[0]})), as before training"]
