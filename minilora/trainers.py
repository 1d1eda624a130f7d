"""An injected model inside transformers' Trainer, TRL's SFTTrainer and Accelerate.

Trainer treats a checkpoint that holds only an adapter as such for PEFT's own model class alone:
``Trainer._load_from_checkpoint`` (resume) and ``Trainer._load_best_model``
(``load_best_model_at_end``) take their adapter branch when ``trainer_utils._is_peft_model(model)``,
an ``isinstance`` check against ``peft.PeftModel``. Any other model is loaded from the
``model.safetensors`` of the checkpoint folder, through ``model.load_state_dict(state_dict, False)``.
So ``inject`` gives a transformers model (per instance; the class is untouched):

- a ``save_pretrained`` that writes the adapters in PEFT's format (``checkpoint.save_pretrained``)
  and, into a folder named as Trainer names its checkpoints (``checkpoint-<step>``), also
  ``model.safetensors``: the tensors that train (every adapter's, and the biases that train), under
  the model's own state-dict keys. ``save_model`` and ``push_to_hub`` folders hold the adapter
  alone;
- a ``load_state_dict`` that takes exactly such a state dict on its own, reporting nothing
  missing (the frozen base is what the model already holds), so resuming and loading the best
  checkpoint restore every trained tensor without a warning that lists each base weight.

Combinations that would train or save the wrong thing are refused in one line where the model
sees them: TRL's fused LM head over an adapted ``lm_head`` (it multiplies by ``lm_head.weight``
directly), PEFT adding its own adapters to a model that holds minilora's, and a save that
DeepSpeed ZeRO-3 left without the adapter's values (what PEFT #2892 reports as empty adapters).

Only torch and safetensors are imported: the trainers' conventions (folder and file names, the
``fused_lm_head`` keyword, DeepSpeed's ``ds_id`` mark) are read, never their code.
"""

from __future__ import annotations

import functools
import inspect
import os
import re

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters import adapter_modules, adapter_names, lora_parameters
from .save import host_tensors, taken_from
from .save import save_pretrained as save_adapters

# transformers' trainer_utils.PREFIX_CHECKPOINT_DIR + "-<global step>", and its SAFE_WEIGHTS_NAME.
TRAINER_CHECKPOINT = re.compile(r"checkpoint-\d+")
RESUME_WEIGHTS = "model.safetensors"
RESUME_METADATA = {"format": "pt", "minilora": "the tensors that train, for Trainer's resume"}


def install(model: nn.Module) -> None:
    """Give a transformers model (a class with ``save_pretrained``) the two instance methods and
    the forward check the module docstring describes; idempotent. Plain torch modules are left
    alone: Trainer saves those as a whole state dict of its own."""
    if not callable(getattr(type(model), "save_pretrained", None)):
        return
    for name, function in (("save_pretrained", save_pretrained), ("load_state_dict", load_state_dict)):
        if name not in model.__dict__:
            setattr(model, name, functools.update_wrapper(functools.partial(function, model), function))
    if _refuse_fused_head not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_refuse_fused_head, with_kwargs=True)


def uninstall(model: nn.Module) -> None:
    """Give the model its class's own ``save_pretrained`` and ``load_state_dict`` back (after
    merge_and_unload). The forward check stays: without adapters it has nothing to refuse."""
    for name in ("save_pretrained", "load_state_dict"):
        installed = model.__dict__.get(name)
        if isinstance(installed, functools.partial) and installed.args[:1] == (model,):
            del model.__dict__[name]


def save_pretrained(model: nn.Module, save_directory: str, *args, **kwargs) -> None:
    """``model.save_pretrained`` after ``inject``: ``minilora.save_pretrained`` (the adapters in
    PEFT's format), plus, in a Trainer checkpoint folder, the tensors that train as
    ``model.safetensors`` (see the module docstring). Takes the same arguments."""
    options = inspect.signature(save_adapters).bind(model, save_directory, *args, **kwargs).arguments
    state_dict, is_main_process = options.get("state_dict"), options.get("is_main_process", True)
    if is_main_process and adapter_names(model):  # the other processes write nothing (their state_dict may be empty)
        _refuse_unsaveable(model, state_dict)
    save_adapters(model, save_directory, *args, **kwargs)
    if is_main_process and adapter_names(model) and TRAINER_CHECKPOINT.fullmatch(
            os.path.basename(os.path.normpath(save_directory))):
        write_resume_weights(model, save_directory, state_dict)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that trains (``requires_grad``) or belongs to an adapter, under its
    state-dict key; a tensor held under two keys (tied copies) is listed under both."""
    wanted = {id(p) for p in model.parameters() if p.requires_grad}
    wanted.update(id(p) for _, p in lora_parameters(model))
    return {name: p for name, p in model.named_parameters(remove_duplicate=False) if id(p) in wanted}


def write_resume_weights(model: nn.Module, folder: str, state_dict=None) -> None:
    """Write ``trainable_state(model)`` to ``folder/model.safetensors``; from ``state_dict`` (a
    full state dict gathered by Trainer under FSDP or DeepSpeed) when given."""
    tensors = trainable_state(model)
    if state_dict is not None:
        tensors = taken_from(model, tensors, state_dict)
    path = os.path.join(folder, RESUME_WEIGHTS)
    save_file(host_tensors(tensors), path + ".tmp", metadata=RESUME_METADATA)
    os.replace(path + ".tmp", path)


def load_state_dict(model: nn.Module, state_dict, strict: bool = True, assign: bool = False):
    """``model.load_state_dict`` after ``inject``: a state dict holding exactly the tensors that
    train (``trainable_state``'s keys, what a Trainer checkpoint's model.safetensors holds) loads
    on its own and reports no missing keys; any other goes to ``nn.Module.load_state_dict``."""
    if state_dict and set(state_dict) == set(trainable_state(model)):
        result = nn.Module.load_state_dict(model, state_dict, strict=False, assign=assign)
        # Every key matched one of the model's; what the call lists as missing is the frozen rest.
        return type(result)(missing_keys=[], unexpected_keys=[])
    return nn.Module.load_state_dict(model, state_dict, strict=strict, assign=assign)


# -- refusals ---------------------------------------------------------------------------------

def _refuse_fused_head(model: nn.Module, args, kwargs):
    """Forward pre-hook. TRL's trainers (``trl.trainer.utils.add_fused_lm_head``, which SFTTrainer
    installs) compute the loss from ``lm_head.weight`` when called with ``fused_lm_head=True`` and
    never call the head: an adapter on it would be ignored and never train. TRL refuses this for
    PEFT's adapters; minilora's are not PEFT's, so they are refused here."""
    if not kwargs.get("fused_lm_head"):
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    adapted = {id(m) for _, m in adapter_modules(model)}
    if (head is not None and id(head) in adapted and head.active_adapter is not None and not head.disabled
            and not head.merged):
        raise ValueError(
            f"the model's output head carries minilora adapter {head.active_adapter!r} (LoRA or a modules_to_save "
            "copy), and TRL's fused LM head (fused_lm_head=True, as SFTTrainer computes its loss) multiplies by "
            "lm_head.weight directly, so that adapter would never train; leave lm_head out of target_modules "
            "and modules_to_save when training with TRL, as TRL requires of PEFT adapters")
    return None


def refuse_peft_on_top(model: nn.Module) -> None:
    """PEFT's ``BaseTuner`` (``get_peft_model``, ``SFTTrainer(peft_config=...)``) and transformers'
    ``add_adapter`` set ``peft_config`` on the model they add adapters to. Two LoRA implementations
    on one model train side by side and each saves only its own (or the other's under wrong keys).
    Called on every forward of an injected model (from its input-embeddings hook)."""
    if model is not None and "peft_config" in model.__dict__:
        raise ValueError(
            "this model holds minilora adapters, and PEFT has added its own on top of them (get_peft_model, "
            "SFTTrainer(peft_config=...) or model.add_adapter); two LoRA implementations on one model would "
            "train and save apart. Pass the injected model without peft_config (minilora.inject already added "
            "the adapter), or give PEFT a model without minilora adapters")


def _refuse_unsaveable(model: nn.Module, state_dict) -> None:
    """DeepSpeed ZeRO-3 keeps a slice of each parameter per process (the parameter itself is empty
    and carries ``ds_id``). transformers' ``Trainer.save_model`` then passes either the gathered
    full state dict (with ``stage3_gather_16bit_weights_on_model_save: true``) or, without it, an
    empty one, from which an adapter would be saved empty."""
    if state_dict is not None and len(state_dict) == 0:
        raise ValueError(
            "save_pretrained got an empty state_dict, so the adapter would be saved without its values; "
            "transformers' Trainer passes one under DeepSpeed ZeRO-3 when stage3_gather_16bit_weights_on_model_save "
            "is false: set it to true in the DeepSpeed config (or use ZeRO-2)")
    if state_dict is None and any(hasattr(p, "ds_id") for _, p in lora_parameters(model)):
        raise ValueError(
            "the adapter's parameters are partitioned by DeepSpeed ZeRO-3 (each process holds a slice), so saving "
            "them as they are would write empty tensors; save through Trainer.save_model with "
            "stage3_gather_16bit_weights_on_model_save: true, or pass the gathered state dict as state_dict=")
