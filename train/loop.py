"""The training loop: one file, top to bottom. Same code on XLA, CUDA and CPU (see device.py).

Per optimizer update: ``gradient_accumulation_steps`` micro-batches of shape (B, L), each
forward + backward with its summed token NLL divided by the token count of the whole update
(so a 4 x 1 and a 2 x 2 split give the same gradient), then clip, AdamW, learning rate.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

import minilora

from . import data as data_mod
from .config import TrainArgs, UsageError
from .device import Device
from .outputs import FINISHED, RunDir, load_tensors_safely, save_tensors_safely
from .report import Reporter, write_report

# Updates after which XLA should have compiled every graph of the loop (first micro-batch,
# accumulating micro-batches, the update); any later compile is a bug.
WARMUP_UPDATES = 2
# Windows of general text evaluated for the forgetting check unless --max_eval_samples says otherwise.
DEFAULT_GENERAL_WINDOWS = 128


# -- the schedule, in optimizer updates ---------------------------------------------------------

def lr_at(update: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate for 0-based optimizer update ``update``: linear warm-up over ``warmup``
    updates (the first update already gets peak/warmup), then linear decay that reaches 0
    just after the last update."""
    if update < warmup:
        return peak * (update + 1) / warmup
    return peak * max(0.0, (total - update) / max(1, total - warmup))


def token_count(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a (B, L) label batch (the first position predicts nothing)."""
    return int((labels[:, 1:] != data_mod.IGNORE).sum())


def summed_nll(model, ids: torch.Tensor, labels: torch.Tensor, device: Device) -> torch.Tensor:
    """Sum over predicted tokens of -log p(next token): a 0-dim float32 tensor."""
    logits = model(input_ids=ids, attention_mask=device.attention_mask(model, ids), use_cache=False).logits  # (B, L, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=data_mod.IGNORE, reduction="sum")


@torch.no_grad()
def evaluate(model, windows: data_mod.Windows, batch_size: int, device: Device, pad_id: int) -> dict:
    """Mean token NLL and perplexity over all windows. One host read at the end."""
    was_training = model.training
    model.eval()
    total = device.tensor(0.0)
    for ids, labels in device.loader(data_mod.batches(windows, batch_size, pad_id)):
        total = total + summed_nll(model, ids, labels, device)
    device.sync()
    tokens = windows.real_tokens - int((windows.labels[:, 0] != data_mod.IGNORE).sum())
    loss = total.item() / max(1, tokens)  # host sync point (once per evaluation)
    model.train(was_training)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def general_eval_windows(args: TrainArgs, tokenizer) -> Optional[data_mod.Windows]:
    """General-English text for the forgetting check: --general_eval_dataset, or by default the
    embedded demo's held-out fortunes (never trained on, by the demo or anyone)."""
    if args.general_eval_dataset == "none":
        return None
    cap = args.max_eval_samples or DEFAULT_GENERAL_WINDOWS
    if args.general_eval_dataset:
        windows = data_mod.load_windows(args.general_eval_dataset, tokenizer, args.max_seq_length, tmp_dir=args.tmp_dir)
    else:
        from .demo import default_general_validation

        windows = data_mod.Packer(tokenizer, args.max_seq_length).pack_texts(default_general_validation())
    return data_mod.cap_windows(windows, cap)


# -- state that survives a restart --------------------------------------------------------------

@dataclass
class Position:
    update: int = 0       # optimizer updates done
    epoch: int = 0        # current epoch
    micro: int = 0        # micro-batches of this epoch already consumed
    nonfinite_skipped: int = 0
    history: list = field(default_factory=list)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


# -- the run ------------------------------------------------------------------------------------

def train_and_report(args: TrainArgs, **kwargs) -> dict:
    """``run``, then (with --compare_full_finetune) full fine-tuning with the same data, steps
    and seed into ``<output_dir>/full_finetune``, then the forgetting report of both."""
    summary = run(args, **kwargs)
    if summary.get("stopped"):
        return summary
    full = None
    if args.compare_full_finetune and args.use_lora:
        print("comparison: full fine-tuning with the same data, steps and seed", flush=True)
        full = run(dataclasses.replace(
            args, use_lora=False, output_dir=f"{args.output_dir.rstrip('/')}/full_finetune",
            learning_rate=args.full_finetune_learning_rate, compare_full_finetune=False, overwrite_output_dir=True,
            resume_from_checkpoint=None, report_to="none"), **{k: v for k, v in kwargs.items() if k != "model"})
        summary["full_finetune"] = full
    write_report(RunDir(args.output_dir, args.tmp_dir), summary, full)
    return summary


# -- one training run ------------------------------------------------------------------------------------

def load_model_and_tokenizer(args: TrainArgs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = args.tokenizer_name_or_path or args.model_name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, token=args.huggingface_token)
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name, token=args.huggingface_token,
            dtype=torch.bfloat16 if args.bf16 else torch.float32)
    except OSError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if args.huggingface_token:
            first = first.replace(args.huggingface_token, "<redacted>")
        raise UsageError(f"--model_name {args.model_name}: could not load it ({first}); give a local directory "
                         "saved with save_pretrained, or a hub id with network access") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def run(args: TrainArgs, model=None, tokenizer=None, general_windows: Optional[data_mod.Windows] = None) -> dict:
    """Train per ``args``; returns the summary that is also written to train_summary.json."""
    started = time.time()
    torch.manual_seed(args.seed)
    out = RunDir(args.output_dir, args.tmp_dir)
    if out.exists(FINISHED) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        raise UsageError(f"--output_dir {args.output_dir} already holds a finished run; pass --overwrite_output_dir "
                         "to replace it, --resume_from_checkpoint to continue, or choose another directory")
    device = Device.choose(args.device)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(args)
    if args.max_seq_length > getattr(model.config, "max_position_embeddings", args.max_seq_length):
        raise UsageError(f"--max_seq_length {args.max_seq_length} exceeds the model's maximum of "
                         f"{model.config.max_position_embeddings} positions")
    data = data_mod.prepare_data(args, tokenizer)
    if args.streaming_data and args.max_steps <= 0:
        raise UsageError("--streaming_data needs --max_steps (a stream has no known length)")
    pad_id = tokenizer.pad_token_id

    if args.use_lora:
        minilora.inject(model, minilora.LoRAConfig(
            r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=args.lora_target_modules,
            bias=args.lora_bias, use_rslora=args.use_rslora))
    if args.gradient_checkpointing:
        device.enable_gradient_checkpointing(model)
    model.to(device.torch_device)
    model.train()
    trainable, total_params = minilora.count_parameters(model)
    if trainable == 0:
        raise UsageError("nothing to train: no parameter requires grad")

    G, B = args.gradient_accumulation_steps, args.per_device_train_batch_size
    micro_per_epoch = math.ceil(len(data.train) / B) if data.train is not None else None
    updates_per_epoch = math.ceil(micro_per_epoch / G) if micro_per_epoch else None
    total_updates = args.max_steps if args.max_steps > 0 else math.ceil(updates_per_epoch * args.num_train_epochs)
    save_every = max(1, round(updates_per_epoch * args.save_fraction)) if updates_per_epoch and args.save_fraction > 0 else 0

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = device.optimizer(param_groups(model, args.weight_decay), args.learning_rate, args.weight_decay)
    pos = Position()
    if args.resume_from_checkpoint:
        pos = _restore(out.resolve_checkpoint(args.resume_from_checkpoint), model, optimizer, device, args)

    eval_sets = {"validation": data.validation}
    if general_windows is None:
        general_windows = general_eval_windows(args, tokenizer)
    if general_windows is not None:
        eval_sets["general"] = general_windows
    reporter = Reporter(args, out, device, total_updates, start_update=pos.update, history=pos.history)
    reporter.start(trainable=trainable, total=total_params,
                   train_windows=len(data.train) if data.train is not None else None)

    def run_eval(tag: str) -> dict:
        results = {name: evaluate(model, w, args.per_device_eval_batch_size, device, pad_id) for name, w in eval_sets.items()}
        reporter.eval(pos.update, results, tag)
        return results

    base_eval = pos.history[0]["eval"] if pos.history and "eval" in pos.history[0] else None
    if base_eval is None:
        base_eval = {k: v for k, v in run_eval("base").items()}
        pos.history.append({"update": 0, "eval": base_eval})

    stop = _StopFlag()  # SIGTERM (preemption): finish the update, checkpoint, exit cleanly
    loss_sum = device.tensor(0.0)  # summed NLL since the last log, stays on the device
    tokens_since_log = 0
    compiles_after_warmup = None
    fallbacks_after_warmup = None

    while pos.update < total_updates and not stop.requested:
        pending = collections.deque()  # host-side facts about each batch, in loader order
        for ids, labels, denom in device.loader(_micro_batches(data, args, pos, pending, pad_id)):
            last_in_group, group_tokens = pending.popleft()
            nll = summed_nll(model, ids, labels, device)
            (nll / denom).backward()
            loss_sum = loss_sum + nll.detach()
            pos.micro += 1
            if not last_in_group:
                device.sync()  # micro-batch graphs stay the same whatever the group size
                continue
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            device.set_lr(optimizer, lr_at(pos.update, args.learning_rate, args.warmup_steps, total_updates))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            device.sync()  # end of the compiled step
            pos.update += 1
            tokens_since_log += group_tokens

            if pos.update == min(total_updates, WARMUP_UPDATES) and device.is_xla:
                compiles_after_warmup = device.compile_count()
                fallbacks_after_warmup = device.host_fallbacks()
            if pos.update % args.logging_steps == 0 or pos.update == total_updates:
                loss = loss_sum.item() / max(1, tokens_since_log)  # host sync point (logging steps only)
                loss_sum, tokens_since_log = device.tensor(0.0), 0
                _check_finite(loss, pos, args)
                reporter.train(pos.update, loss, lr_at(pos.update - 1, args.learning_rate, args.warmup_steps, total_updates),
                               epoch=pos.epoch + (pos.micro / micro_per_epoch if micro_per_epoch else 0))
            if args.eval_steps and pos.update % args.eval_steps == 0 and pos.update < total_updates:
                pos.history.append({"update": pos.update, "eval": run_eval("eval")})
            if (save_every and pos.update % save_every == 0 and pos.update < total_updates) or stop.requested:
                _save_checkpoint(out, model, optimizer, device, pos, args)
            if pos.update >= total_updates or stop.requested:
                break
        else:
            pos.epoch, pos.micro = pos.epoch + 1, 0

    if stop.requested and pos.update < total_updates:
        reporter.close()
        print(f"stopped by SIGTERM after update {pos.update}; checkpoint saved. Resume with: "
              f"minilora-train ... --output_dir {args.output_dir} --resume_from_checkpoint latest", flush=True)
        return {"stopped": True, "update": pos.update}

    final_eval = run_eval("final")
    xla = {}
    if device.is_xla:
        xla = {"compiles_total": device.compile_count(),
               "compiles_after_warmup": device.compile_count() - (compiles_after_warmup or 0),
               "host_fallbacks_after_warmup": {k: v - (fallbacks_after_warmup or {}).get(k, 0)
                                               for k, v in device.host_fallbacks().items()
                                               if v - (fallbacks_after_warmup or {}).get(k, 0)}}
    _save_final(out, model, tokenizer, args)
    summary = {
        "updates": pos.update, "trainable_params": trainable, "total_params": total_params,
        "base": base_eval, "final": final_eval, "device": device.describe(), "wall_seconds": time.time() - started,
        "output_dir": args.output_dir, "use_lora": args.use_lora, "nonfinite_skipped": pos.nonfinite_skipped,
        "adapter_bytes": _size(out.path("adapter_model.safetensors")) if args.use_lora else None,
        "model_bytes": None if args.use_lora else _size(out.path("model.safetensors")),
        "peak_memory_bytes": device.peak_memory_bytes(), "xla": xla,
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                     for t in state.values() if isinstance(t, torch.Tensor)),
        "train_windows": len(data.train) if data.train is not None else None,
        "steps_per_second": reporter.steps_per_second(),
    }
    reporter.finish(summary)
    out.write_json(FINISHED, summary)
    return summary


def _micro_batches(data: data_mod.TrainData, args: TrainArgs, pos: Position, pending, pad_id: int):
    """This epoch's remaining micro-batches as (ids, labels, denominator), where the
    denominator is the loss-carrying token count of the batch's whole optimizer update; for
    each batch, (last in its update?, that token count) goes to ``pending``."""
    B, G = args.per_device_train_batch_size, args.gradient_accumulation_steps
    if data.train is not None:
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed + pos.epoch))
        source = data_mod.batches(data.train, B, pad_id, order, start=pos.micro)
    else:
        source = data_mod.stream_batches(data.stream(pos.epoch), B, pad_id, args.max_seq_length, skip=pos.micro)
    group: list = []
    for batch in itertools.chain(source, [None]):
        if batch is not None:
            group.append(batch)
        if group and (len(group) == G or batch is None):  # the epoch's last group may be shorter
            tokens = sum(token_count(labels) for _, labels in group)
            for i, (ids, labels) in enumerate(group):
                pending.append((i == len(group) - 1, tokens))
                yield ids, labels, torch.tensor([float(max(1, tokens))])  # (1,): data, never a constant (see Device.tensor)
            group = []


def _check_finite(loss: float, pos: Position, args: TrainArgs) -> None:
    if math.isfinite(loss):
        return
    raise UsageError(
        f"the training loss became {loss} at update {pos.update}. Lower --learning_rate (e.g. 1e-4), keep "
        "--max_grad_norm at 1.0 or lower, or raise --warmup_steps; resume from the last good checkpoint with "
        f"--resume_from_checkpoint latest (checkpoints in {args.output_dir})")


def _save_checkpoint(out: RunDir, model, optimizer, device: Device, pos: Position, args: TrainArgs) -> None:
    tmp = out.begin_checkpoint(pos.update)
    if args.use_lora:
        minilora.save_adapter(model, tmp, base_model_name_or_path=args.model_name)
    else:
        from safetensors.torch import save_file

        save_file(trainable_state(model), os.path.join(tmp, "model.safetensors"))
    state = optimizer.state_dict()
    save_tensors_safely(_to_cpu(state), os.path.join(tmp, "optimizer.pt"))
    save_tensors_safely(device.rng_state(), os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump({"update": pos.update, "epoch": pos.epoch, "micro": pos.micro,
                   "nonfinite_skipped": pos.nonfinite_skipped, "history": pos.history}, f, indent=2)
    out.commit_checkpoint(tmp, pos.update, args.save_total_limit)


def _restore(path: str, model, optimizer, device: Device, args: TrainArgs) -> Position:
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.exists(state_file):
        raise UsageError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no trainer_state.json)")
    with open(state_file) as f:
        state = json.load(f)
    if args.use_lora:
        config, _ = minilora.read_adapter_config(path)
        from safetensors.torch import load_file

        weights = load_file(os.path.join(path, "adapter_model.safetensors"))
        expected = minilora.lora_state_dict(model)
        if set(weights) != set(expected):
            raise UsageError(f"--resume_from_checkpoint {path}: the checkpoint's adapter does not match this run's "
                             "LoRA settings (different targets or rank?)")
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(weights[key].to(target.dtype))
    else:
        from safetensors.torch import load_file

        weights = load_file(os.path.join(path, "model.safetensors"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in weights:
                    p.copy_(weights[name].to(p.dtype))
    optimizer.load_state_dict(load_tensors_safely(os.path.join(path, "optimizer.pt")))
    device.set_rng_state(load_tensors_safely(os.path.join(path, "rng.pt")))
    return Position(update=state["update"], epoch=state["epoch"], micro=state["micro"],
                    nonfinite_skipped=state.get("nonfinite_skipped", 0), history=state.get("history", []))


def _save_final(out: RunDir, model, tokenizer, args: TrainArgs) -> None:
    if args.use_lora:
        minilora.save_adapter(model, out.local, base_model_name_or_path=args.model_name)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            out.publish(name)
    else:
        model.to("cpu")  # the run is over; safetensors reads host memory (XLA storage has none)
        model.save_pretrained(out.local)
        for name in os.listdir(out.local):
            if name.startswith("model") or name in ("config.json", "generation_config.json"):
                out.publish(name)
    tokenizer.save_pretrained(out.local)
    for name in os.listdir(out.local):
        if "token" in name or name == "special_tokens_map.json":
            out.publish(name)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _size(path: str) -> Optional[int]:
    return os.path.getsize(path) if os.path.exists(path) else None


class _StopFlag:
    """Set by SIGTERM; the loop finishes its update, saves a checkpoint and returns."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            pass

    def _handle(self, signum, frame):
        self.requested = True
        print("SIGTERM received: finishing this update and saving a checkpoint", file=sys.stderr, flush=True)
