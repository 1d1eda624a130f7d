"""The training loop: one file, read top to bottom in the order a run goes. The same code runs on
XLA, CUDA and CPU, on one device or many: what differs sits behind ``minilora_train.device.Device``.
What a run measures of forgetting, and the guard against it, attach at named points
(``minilora_train.forgetting.Check``: before adapting, before training, after each evaluation,
after training).

Per optimizer update: ``gradient_accumulation_steps`` micro-batches of shape (B, L), each
forward + backward with its summed token NLL divided by the token count of the whole update
(so a 4 x 1 and a 2 x 2 split give the same gradient), then clip, AdamW, learning rate.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import pickle
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors import SafetensorError

import minilora

from . import data, forgetting
from .base_model import resolve_bases, top_layers
from .config import TrainArgs, UsageError
from .device import Device, move_model
from .loss import module_called, nll_result, predicted_tokens
from .loss import summed_nll as model_nll
from .outputs import (FINISHED, RunDir, check_output_dir_apart, check_resume_settings, load_safetensors,
                      load_tensors_safely, resume_settings, save_tensors_safely)
from .report import Reporter

# Updates after which XLA should have compiled every graph of the loop (first micro-batch,
# accumulating micro-batches, the update); any later compile is a bug.
WARMUP_UPDATES = 2


def train_and_report(args: TrainArgs, device: Optional[Device] = None, **kwargs) -> dict:
    """``run``, then (with --compare_full_finetune) full fine-tuning with the same data, steps
    and seed into ``<output_dir>/full_finetune``, then the forgetting report of both."""
    device = device or Device.start(args)
    kwargs.setdefault("base_cache", {})  # the full fine-tuning run starts from the same base: measure it once
    summary = run(args, device=device, **kwargs)
    if summary.get("stopped"):
        return summary
    full = None
    comparison = forgetting.comparison_args(args)
    if comparison is not None:
        if device.is_main:
            print("comparison: full fine-tuning with the same data, steps and seed", flush=True)
        full = run(comparison, device=device, **{k: v for k, v in kwargs.items() if k != "model"})
        summary["full_finetune"] = full
    if device.is_main:
        forgetting.write_report(RunDir(args.output_dir, args.tmp_dir), summary, full)
    return summary


def run(args: TrainArgs, model=None, tokenizer=None, general_windows: Optional[data.Windows] = None,
        device: Optional[Device] = None, base_cache: Optional[dict] = None) -> dict:
    """Train per ``args`` (on ``device``, default the one ``args`` names); returns the summary
    that is also written to train_summary.json. Bad settings or input raise UsageError (or
    AdapterLoadError) before anything is written, and an output directory this call created is
    removed again (after any failure that left it empty).

    ``base_cache``: a dict shared by runs in one process that start from the same base (the
    --compare_full_finetune run, a sweep): what a run measures of the base before training (its
    evaluation, its chat answers, its multiple-choice answers) is measured once and reused
    (forgetting.Check)."""
    args = resolve_bases(args)  # a .gguf base: its converted folder, which the adapter then names
    check_output_dir_apart(args)  # never into the base's folder or a data folder
    run_dir = RunDir(args.output_dir, args.tmp_dir)
    try:
        if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 holds the directory for every rank
            run_dir.lock()
        return _run(args, run_dir, device, model, tokenizer, general_windows, base_cache)
    except BaseException:  # a folder this run created and wrote nothing into goes, whatever stopped it
        run_dir.unlock()
        run_dir.discard_if_unused()
        raise
    finally:
        run_dir.unlock()


def _run(args: TrainArgs, run_dir: RunDir, device: Optional[Device], model, tokenizer,
         general_windows: Optional[data.Windows], base_cache: Optional[dict]) -> dict:
    started = time.time()
    torch.manual_seed(args.seed)
    _check_output_dir(args, run_dir)
    device = device or Device.start(args)
    check = forgetting.Check(args, run_dir, device, shared=base_cache)  # drift, replay, medical MC: see its docstring

    # model init (and the data, tokenised with the model's tokenizer; the forgetting guard's windows mixed in)
    model, tokenizer, train_data = _model_and_data(args, device, model, tokenizer, check)
    args = check.args  # with the forgetting guard's share for this base
    trainable, total_params = minilora.count_parameters(model)
    if trainable == 0:
        raise UsageError("nothing to train: no parameter requires grad")

    # optimizer (and the state a resumed run continues from)
    plan = Plan.of(args, train_data, device)
    optimizer = device.optimizer(param_groups(model, args.weight_decay), args.learning_rate, args.weight_decay)
    device.seed_per_rank(args.seed)  # torchrun: each rank its own dropout masks; a resume restores each rank's
    pos = Position()
    if args.resume_from_checkpoint:
        pos = _restore(run_dir.resolve_checkpoint(args.resume_from_checkpoint), model, optimizer, device, args)
    # evaluation sets, and the base's answers the forgetting check compares with after training
    eval_sets = {"validation": train_data.validation}
    general = general_windows if general_windows is not None else forgetting.general_eval_windows(args, tokenizer)
    if general is not None:
        eval_sets["general"] = general
    check.before_training(model, tokenizer, eval_sets)
    bare_model = model  # generation and drift scoring run on the model, not its DDP wrapper
    training = Training(args, device, run_dir, device.wrap(model, optimizer), optimizer, tokenizer.pad_token_id,
                        loss_is_chunked(args, device))

    # reporting
    if not args.resume_from_checkpoint and device.is_main:
        run_dir.clear_previous_run()  # --overwrite_output_dir: an old run's checkpoints must never be resumed from
    reporter = Reporter(args, run_dir, device, plan.total_updates, start_update=pos.update, history=pos.history)
    reporter.start(trainable=trainable, total=total_params, train_windows=plan.train_windows)
    evaluation = Evaluation(eval_sets, training, reporter, check, bare_model)
    base_eval = _base_evaluation(pos, evaluation, check, reporter)

    # training loop
    stopped = _train(training, train_data, plan, pos, reporter, evaluation)
    if stopped:
        reporter.close()
        if device.is_main:
            print(f"stopped by SIGTERM after update {pos.update}; checkpoint saved. Resume with: "
                  f"minilora-train ... --output_dir {args.output_dir} --resume_from_checkpoint latest", flush=True)
        return {"stopped": True, "update": pos.update}

    # finish
    final_eval = evaluation(pos.update, "final")
    xla = device.xla_counts()  # before the forgetting check's scoring and saving, which compile graphs of their own
    forgot = check.after_training(bare_model, tokenizer)
    _save_final(run_dir, training.model, tokenizer, device, args)
    summary = {
        "updates": pos.update, "trainable_params": trainable, "total_params": total_params,
        "base": base_eval, "final": final_eval, "device": device.describe(), "wall_seconds": time.time() - started,
        "output_dir": args.output_dir, "use_lora": args.use_lora, "nonfinite_skipped": pos.nonfinite_skipped,
        "adapter_bytes": _size(run_dir.path("adapter_model.safetensors")) if args.use_lora else None,
        "model_bytes": None if args.use_lora else _size(run_dir.path("model.safetensors")),
        "peak_memory_bytes": device.peak_memory_bytes(), "xla": xla, "compile": device.compile_counts(),
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                     for t in state.values() if isinstance(t, torch.Tensor)),
        "train_windows": plan.train_windows, "steps_per_second": reporter.steps_per_second(),
        "learning_rate": args.learning_rate, **forgot,
    }
    reporter.finish(summary)
    if device.is_main:
        run_dir.write_json(FINISHED, summary)
    return summary


def _check_output_dir(args: TrainArgs, run_dir: RunDir) -> None:
    """A finished run, or an unfinished one's checkpoints, are replaced or continued only when asked;
    a folder holding files that no run wrote is written into only when asked."""
    if args.overwrite_output_dir or args.resume_from_checkpoint:
        return
    if run_dir.exists(FINISHED):
        raise UsageError(f"--output_dir {args.output_dir} already holds a finished run; pass --overwrite_output_dir "
                         "to replace it, --resume_from_checkpoint to continue, or choose another directory")
    if run_dir.checkpoints():
        raise UsageError(f"--output_dir {args.output_dir} holds the checkpoints of an unfinished run; pass "
                         "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to start over, "
                         "or choose another directory")
    foreign = run_dir.foreign_entries()
    if foreign:  # someone's model or project folder: the run would replace its files of the same names
        raise UsageError(f"--output_dir {args.output_dir} holds files no minilora-train run wrote ("
                         f"{', '.join(foreign[:4])}{', …' if len(foreign) > 4 else ''}); the run would write its "
                         "adapter or model, tokenizer and reports among them, replacing files of the same names "
                         "(config.json, tokenizer.json …): choose a new or empty directory, or pass "
                         "--overwrite_output_dir to write into it anyway")


# -- model init ---------------------------------------------------------------------------------

def load_model_and_tokenizer(args: TrainArgs):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if args.quantize == "gguf":  # the file's own blocks: its tokenizer and config come with it
        from .gguf_base import load_gguf_base

        return load_gguf_base(args.model_name, torch.bfloat16 if args.bf16 else torch.float32)
    source = args.tokenizer_name_or_path or args.model_name
    if not args.model_name:
        raise UsageError("--dataset_dir needs --model_name (a hub id or a local directory); with neither, the "
                         "embedded demo runs")
    for flag, name in (("--model_name", args.model_name), ("--tokenizer_name_or_path", source)):
        if name.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(name)):
            raise UsageError(f"{flag} {name}: no such directory (a local model is a folder written by save_pretrained, "
                             "or a .gguf file)")
    damaged = "a truncated or damaged download: download it again"

    def read(flag: str, name: str, what: str, advice: str, load):
        """``load()``; a model that cannot be found, or files of it that cannot be read, as one line."""
        try:
            return load()
        except OSError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            if args.huggingface_token:
                first = first.replace(args.huggingface_token, "<redacted>")
            raise UsageError(f"{flag} {name}: could not load it ({first}); " + (
                damaged if os.path.isdir(os.path.expanduser(name)) else
                "give a local directory saved with save_pretrained, or a hub id with network access")) from None
        except (ValueError, TypeError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise UsageError(f"{flag} {name}: its {what} could not be read ({type(e).__name__}: {first}); "
                             + advice) from None

    config = read("--model_name", args.model_name, "config.json", damaged,  # (a config.json holding a list: TypeError)
                  lambda: AutoConfig.from_pretrained(args.model_name, token=args.huggingface_token))
    tokenizer = read("--tokenizer_name_or_path" if source != args.model_name else "--model_name", source,
                     "tokenizer files", damaged,
                     lambda: AutoTokenizer.from_pretrained(source, token=args.huggingface_token))
    model = read("--model_name", args.model_name, "weights",  # truncated, or an unsafe pickle
                 "a truncated download or a pickle file (.bin) that may run code is refused: re-download it, or "
                 "convert it to safetensors where you trust its source",
                 lambda: AutoModelForCausalLM.from_pretrained(
                     args.model_name, config=config, token=args.huggingface_token,
                     dtype=torch.bfloat16 if args.bf16 else torch.float32))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _model_and_data(args: TrainArgs, device: Device, model, tokenizer, check: forgetting.Check):
    """(model, tokenizer, TrainData): the base (``model`` or --model_name) with the LoRA adapter
    injected (--use_lora) and gradient checkpointing set up, on the device in training mode; the
    training windows with what the forgetting check mixes in (the guard, --replay_general)."""
    if model is None:
        model, tokenizer = load_model_and_tokenizer(args)
    if args.max_seq_length > getattr(model.config, "max_position_embeddings", args.max_seq_length):
        raise UsageError(f"--max_seq_length {args.max_seq_length} exceeds the model's maximum of "
                         f"{model.config.max_position_embeddings} positions")
    train_data = data.prepare_data(args, tokenizer)
    train_data = check.before_adapting(model, tokenizer, train_data)  # before quantize and inject: the base's own answers
    if args.streaming_data and args.max_steps <= 0:
        raise UsageError("--streaming_data needs --max_steps (a stream has no known length)")
    if args.quantize and args.quantize != "gguf":  # before inject, which then wraps the quantized Linears
        try:
            minilora.quantize(model, args.quantize, embeddings=args.quantize_embeddings)
        except ValueError as e:
            raise UsageError(f"--quantize {args.quantize}: {e}") from None
    if args.use_lora:
        layers = top_layers(model, args.lora_top_layers)
        try:
            minilora.inject(model, minilora.LoRAConfig(
                r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=args.lora_target_modules,
                bias=args.lora_bias, use_rslora=args.use_rslora, layers_to_transform=layers))
        except ValueError as e:  # e.g. no module matched: the message lists the Linear names there are
            raise UsageError(f"--lora_target_modules: {e}") from None
    model = device.place(model, gradient_checkpointing=args.gradient_checkpointing)
    if args.compile:
        device.compile(module_called(model, args.chunked_loss))
    return model, tokenizer, train_data


# -- optimizer ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """The run's arithmetic: micro-batches of ``batch`` rows (over all devices), ``accumulate``
    of them per optimizer update, ``total_updates`` updates, a checkpoint every ``save_every``
    (0: none). Epoch lengths are None when streaming (a stream has no known length)."""

    batch: int
    accumulate: int
    total_updates: int
    save_every: int
    train_windows: Optional[int]
    micro_per_epoch: Optional[int]

    @classmethod
    def of(cls, args: TrainArgs, train_data: data.TrainData, device: Device) -> "Plan":
        batch, accumulate = device.global_batch(args.per_device_train_batch_size), args.gradient_accumulation_steps
        windows = len(train_data.train) if train_data.train is not None else None
        micro_per_epoch = math.ceil(windows / batch) if windows is not None else None
        updates_per_epoch = math.ceil(micro_per_epoch / accumulate) if micro_per_epoch else None
        total = args.max_steps if args.max_steps > 0 else math.ceil(updates_per_epoch * args.num_train_epochs)
        save_every = (max(1, round(updates_per_epoch * args.save_fraction))
                      if updates_per_epoch and args.save_fraction > 0 else 0)
        return cls(batch, accumulate, total, save_every, windows, micro_per_epoch)


def lr_at(update: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate for 0-based optimizer update ``update``: linear warm-up over ``warmup``
    updates (the first update already gets peak/warmup), then linear decay that reaches 0
    just after the last update."""
    if update < warmup:
        return peak * (update + 1) / warmup
    return peak * max(0.0, (total - update) / max(1, total - warmup))


def param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class Position:
    """Where a run stands; saved with every checkpoint (trainer_state.json)."""

    update: int = 0       # optimizer updates done
    epoch: int = 0        # current epoch
    micro: int = 0        # micro-batches of this epoch already consumed
    nonfinite_skipped: int = 0
    history: list = field(default_factory=list)


def _restore(path: str, model, optimizer, device: Device, args: TrainArgs) -> Position:
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.exists(state_file):
        raise UsageError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no trainer_state.json)")
    try:
        with open(state_file) as f:
            state = json.load(f)
        position = Position(update=int(state["update"]), epoch=int(state["epoch"]), micro=int(state["micro"]),
                            nonfinite_skipped=int(state.get("nonfinite_skipped", 0)), history=state.get("history", []))
        if min(position.update, position.epoch, position.micro, position.nonfinite_skipped) < 0 \
                or not isinstance(position.history, list) or not all(isinstance(h, dict) for h in position.history):
            raise ValueError("negative counters, or a history that is not a list of records")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--resume_from_checkpoint {path}: trainer_state.json is damaged ({e!r})") from None
    check_resume_settings(state.get("settings"), args, path, device.global_batch(1))
    # Safetensors and torch.load(weights_only=True) only: reading a checkpoint runs no code.
    optimizer_state = load_tensors_safely(os.path.join(path, "optimizer.pt"))
    rng_state = load_tensors_safely(os.path.join(path, "rng.pt"))
    if args.use_lora:
        minilora.checkpoint.load_adapter_weights(model, path)  # strict: AdapterLoadError names key and shapes
    else:
        weights = load_safetensors(os.path.join(path, "model.safetensors"))
        expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
        wrong = [f"missing from file: {k}" for k in expected if k not in weights]
        wrong += [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(p.shape)}"
                  for k, p in expected.items() if k in weights and weights[k].shape != p.shape]
        if wrong:
            raise UsageError(f"--resume_from_checkpoint {path}: the checkpoint does not fit this model ("
                             + "; ".join(wrong[:5]) + (f"; … and {len(wrong) - 5} more" if len(wrong) > 5 else "") + ")")
        with torch.no_grad():
            for name, p in expected.items():
                p.copy_(weights[name].to(p.dtype))
    try:
        per_rank = rng_state["ranks"] if "ranks" in rng_state else [rng_state]  # torchrun runs store one per rank
        if not device.restore(optimizer, optimizer_state, per_rank) and device.is_main:
            print(f"note: {path} holds the RNG states of {len(per_rank)} process(es), a different number from this "
                  "run's; dropout masks start afresh, so the run does not continue exactly", flush=True)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UsageError(f"--resume_from_checkpoint {path}: its optimizer or RNG state does not fit this run "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return position


# -- evaluation ---------------------------------------------------------------------------------

def summed_nll(model, ids: torch.Tensor, labels: torch.Tensor, device: Device, chunked: bool = True) -> torch.Tensor:
    """Sum over predicted tokens of -log p(next token) for a (B, L) batch: a 0-dim float32 tensor
    (``chunked``: the LM head and the loss over chunks of tokens, never the full logits; loss.py)."""
    # Under SPMD the batch is sharded across devices and the chunks would cut across the shards:
    # the full logits there (each device's share of them)
    return model_nll(model, ids, labels, device.attention_mask(model, ids), chunked and device.layout.kind != "spmd")


def loss_is_chunked(args: TrainArgs, device: Device) -> bool:
    """Whether the run's loss is chunked (loss.py): --chunked_loss, the default, on CUDA and the
    CPU; on XLA only when --chunked_loss is given by name (or in --config), and not under SPMD.

    On XLA the chunks run as one compiled loop that holds one chunk's logits at a time, but on
    XLA's CPU device two runs of the app's update at SmolLM2's shape disagreed on whether it is
    faster than the full logits, and no TPU has measured it (docs/benchmarks.md, "The chunked loss
    on XLA"). So XLA keeps the full logits unless asked: the choice for a batch whose logits do
    not fit."""
    if not args.chunked_loss:
        return False
    if not device.is_xla:
        return True
    asked = "chunked_loss" in getattr(args, "given", ())
    if asked and device.layout.kind == "spmd":
        raise UsageError(f"--chunked_loss: under SPMD ({device.layout.ways} devices) the loss takes the full logits, "
                         "each device those of its own rows; drop --chunked_loss")
    return asked


@torch.no_grad()
def evaluate(model, windows: data.Windows, batch_size: int, device: Device, pad_id: int,
             chunked: bool = True) -> dict:
    """Mean token NLL and perplexity over all windows (``loss.nll_result``). One host read at
    the end."""
    was_training = model.training
    model.eval()
    total = device.tensor(0.0)
    for ids, labels in device.loader(data.batches(windows, device.global_batch(batch_size), pad_id)):
        total = total + summed_nll(model, ids, labels, device, chunked)
    device.sync()
    nll = device.sum_over_processes(total).item()  # host sync point (once per evaluation)
    model.train(was_training)
    return nll_result(nll, int(predicted_tokens(windows.labels)))


class Evaluation:
    """The run's evaluations: each set's mean token NLL and perplexity, reported with what the
    forgetting check measures after them (chat drift)."""

    def __init__(self, sets: dict, training: "Training", reporter: Reporter, check: forgetting.Check, bare_model):
        self.sets, self.training, self.reporter, self.check, self.bare_model = sets, training, reporter, check, bare_model

    def __call__(self, update: int, tag: str) -> dict:
        t = self.training
        results = {name: evaluate(t.model, windows, t.args.per_device_eval_batch_size, t.device, t.pad_id, t.chunked)
                   for name, windows in self.sets.items()}
        self.reporter.eval(update, results, tag, self.check.after_evaluation(self.bare_model, tag))
        return results


def _base_evaluation(pos: Position, evaluation: Evaluation, check: forgetting.Check, reporter: Reporter) -> dict:
    """The base's evaluation: a resumed run's from its history, one measured by an earlier run of
    this process from the same base (``check.base_evaluation``), or measured now."""
    if pos.history and "eval" in pos.history[0]:
        return pos.history[0]["eval"]
    base_eval = check.base_evaluation()
    if base_eval is not None:
        reporter.eval(pos.update, base_eval, "base")
    else:
        base_eval = evaluation(pos.update, "base")
    pos.history.append({"update": 0, "eval": base_eval})
    check.keep_base_evaluation(base_eval)
    return base_eval


# -- training loop ------------------------------------------------------------------------------

@dataclass
class Training:
    """What the training loop works on, set up before its first update: the model (wrapped for
    torchrun or SPMD) and its optimizer, the device they are on, the run's directory, the padding
    id and whether the loss is chunked (``loss_is_chunked``)."""

    args: TrainArgs
    device: Device
    run_dir: RunDir
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    pad_id: int
    chunked: bool

    def nll(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed NLL of a (B, L) batch's predicted tokens: a 0-dim float32 tensor (``summed_nll``)."""
        return summed_nll(self.model, ids, labels, self.device, self.chunked)


def _train(t: Training, train_data: data.TrainData, plan: Plan, pos: Position, reporter: Reporter,
           evaluation: Evaluation) -> bool:
    """Optimizer updates from ``pos`` to ``plan.total_updates``, with logging, evaluations and
    checkpoints on the way; ``pos`` advances. Returns True when SIGTERM stopped it early."""
    args, device, model, optimizer = t.args, t.device, t.model, t.optimizer
    stop = _StopFlag()  # SIGTERM (preemption): finish the update, checkpoint, exit cleanly
    nonfinite = _NonFiniteGuard(args, device, optimizer, [p for p in model.parameters() if p.requires_grad])
    loss_sum = device.tensor(0.0)  # summed NLL since the last log, stays on the device
    update_nll = device.tensor(0.0)  # summed NLL of this update's micro-batches
    tokens_since_log = 0
    while pos.update < plan.total_updates and not stop.requested:
        update_ends = collections.deque()  # per micro-batch, in loader order: (last of its update?, update's tokens)
        for ids, labels, denom in device.loader(_micro_batches(train_data, args, plan, pos, update_ends, t.pad_id)):
            last_in_update, update_tokens = update_ends.popleft()
            with device.no_backward_sync(model, enabled=not last_in_update):  # torchrun: reduce once per update
                nll = t.nll(ids, labels)
                (nll / denom).backward()
            update_nll = update_nll + nll.detach()
            pos.micro += 1
            if not last_in_update:
                device.sync()  # micro-batch graphs stay the same whatever the update's size
                continue
            device.set_lr(optimizer, lr_at(pos.update, args.learning_rate, args.warmup_steps, plan.total_updates))
            loss_sum = loss_sum + nonfinite.step(update_nll, denom)  # clip, AdamW; see _NonFiniteGuard
            update_nll = torch.zeros_like(update_nll)
            optimizer.zero_grad(set_to_none=True)
            device.sync()  # end of the compiled step
            device.release_freed_host_memory()  # MINILORA_MALLOC_TRIM=1, eager CPU: freed pages back to the kernel
            pos.update += 1
            tokens_since_log += update_tokens

            if pos.update == min(plan.total_updates, WARMUP_UPDATES):
                device.mark_warm()  # every graph of the loop has run once
            if pos.update % args.logging_steps == 0 or pos.update == plan.total_updates:
                tokens_since_log -= nonfinite.read(pos)  # skipped updates' tokens leave the mean
                loss = device.sum_over_processes(loss_sum).item()  # host sync point (logging steps only)
                loss = loss / tokens_since_log if tokens_since_log > 0 else math.nan  # nan: every update was skipped
                loss_sum, tokens_since_log = device.tensor(0.0), 0
                _check_finite(loss, pos, args)
                reporter.train(pos.update, loss, lr_at(pos.update - 1, args.learning_rate, args.warmup_steps,
                                                       plan.total_updates),
                               epoch=pos.epoch + (pos.micro / plan.micro_per_epoch if plan.micro_per_epoch else 0))
            if args.eval_steps and pos.update % args.eval_steps == 0 and pos.update < plan.total_updates:
                pos.history.append({"update": pos.update, "eval": evaluation(pos.update, "eval")})
            stop.agree(device)  # torchrun: every rank stops after the same update (one tiny host-side all-reduce)
            if (plan.save_every and pos.update % plan.save_every == 0 and pos.update < plan.total_updates) \
                    or stop.requested:
                tokens_since_log -= nonfinite.read(pos)  # the checkpoint carries the exact skip count
                _save_checkpoint(t, pos)
            if pos.update >= plan.total_updates or stop.requested:
                break
        else:
            pos.epoch, pos.micro = pos.epoch + 1, 0
    return stop.requested and pos.update < plan.total_updates


class _StopFlag:
    """SIGTERM (preemption): the loop finishes its update, saves a checkpoint and returns.

    The signal only marks this process; ``agree`` turns that into ``requested`` at an update
    boundary. Under torchrun every rank gets the signal (torchrun forwards it; a scheduler may
    send it to one worker), but each notices it at its own update. They must stop after the same
    one: a rank that stopped early leaves the others in a gradient all-reduce that never completes."""

    def __init__(self):
        self.requested = False  # agreed: every process stops after this update
        self._signalled = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            pass

    def agree(self, device: Device) -> None:
        """Every process, at the same update boundary. torchrun: a host-side all-reduce (MAX) of
        the flag. Elsewhere no collective and no host read: the flag is a Python bool."""
        self.requested = device.any_process(self._signalled)

    def _handle(self, signum, frame):
        self._signalled = True
        print("SIGTERM received: finishing this update and saving a checkpoint", file=sys.stderr, flush=True)


class _NonFiniteGuard:
    """Clipping and the AdamW step, for updates whose loss or gradient may not be finite.

    Checking on the host every update would be an XLA sync, so the check stays on the device.
    By default a non-finite gradient norm makes the update's logged loss non-finite too (a
    non-finite loss already gives non-finite gradients), the next logging step stops the run,
    and _save_checkpoint refuses a non-finite optimizer state, so the latest checkpoint stays
    good. With --skip_nonfinite_steps such an update is undone with torch.where (parameters
    and optimizer state; this keeps a copy of both) and counted; the count is read at logging
    steps and checkpoints, which are host sync points anyway.
    """

    def __init__(self, args: TrainArgs, device: Device, optimizer, params: list):
        self.args, self.device, self.optimizer, self.params = args, device, optimizer, params
        self.unread = self._zeros()  # (2,): [updates skipped, their tokens] since the last read

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(2).to(self.device.torch_device)  # device data, not a graph constant

    def step(self, update_nll: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
        """Clip, step; returns what this update adds to the logged summed NLL, shape (1,)."""
        norm = self.device.grad_norm(self.params, self.args.max_grad_norm)
        if not self.args.skip_nonfinite_steps:
            self.optimizer.step()
            return update_nll + norm * 0  # nan when the gradient is not finite
        bad = ~torch.isfinite(norm)  # 0-dim bool, on the device
        before = [(p, p.detach().clone(), {k: v.clone() for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)})
                  for p in self.params]
        self.optimizer.step()
        with torch.no_grad():
            for p, old, old_state in before:
                p.copy_(torch.where(bad, old, p))
                for key, value in self.optimizer.state[p].items():
                    if torch.is_tensor(value):  # state created by this very step goes back to zeros
                        value.copy_(torch.where(bad, old_state.get(key, torch.zeros_like(value)), value))
        self.unread = self.unread + torch.cat([bad.reshape(1).float(), torch.where(bad, denom, 0.0)])
        return torch.where(bad, 0.0, update_nll)

    def read(self, pos: Position) -> int:
        """Adds the updates skipped since the last read to pos.nonfinite_skipped (and says so);
        returns the tokens they held. Without --skip_nonfinite_steps: 0, and no host read."""
        if not self.args.skip_nonfinite_steps:
            return 0
        skipped, tokens = (int(v) for v in self.unread.to("cpu").tolist())  # host sync point (logging steps, checkpoints)
        self.unread = self._zeros()
        if skipped:
            pos.nonfinite_skipped += skipped
            print(f"update {pos.update}: skipped {skipped} update(s) with a non-finite loss or gradient "
                  f"({pos.nonfinite_skipped} in this run)", flush=True)
        return tokens


def _micro_batches(train_data: data.TrainData, args: TrainArgs, plan: Plan, pos: Position, update_ends, pad_id: int):
    """This epoch's remaining micro-batches as (ids, labels, denominator), where the
    denominator is the loss-carrying token count of the batch's whole optimizer update; for
    each batch, (last in its update?, that token count) goes to ``update_ends``."""
    if train_data.train is not None:
        order = torch.randperm(len(train_data.train), generator=torch.Generator().manual_seed(args.seed + pos.epoch))
        source = data.batches(train_data.train, plan.batch, pad_id, order, start=pos.micro)
    else:
        source = data.stream_batches(train_data.stream(pos.epoch), plan.batch, pad_id, args.max_seq_length,
                                     skip=pos.micro)
    group: list = []
    for batch in itertools.chain(source, [None]):
        if batch is not None:
            group.append(batch)
        if group and (len(group) == plan.accumulate or batch is None):  # the epoch's last update may be shorter
            tokens = sum(int(predicted_tokens(labels)) for _, labels in group)
            for i, (ids, labels) in enumerate(group):
                update_ends.append((i == len(group) - 1, tokens))
                yield ids, labels, torch.tensor([float(max(1, tokens))])  # (1,): data, never a constant (see Device.tensor)
            group = []


def _check_finite(loss: float, pos: Position, args: TrainArgs) -> None:
    """Stop the run on a non-finite loss or gradient (both show in the logged loss, see
    _NonFiniteGuard), unless --skip_nonfinite_steps (then nan only says every update since
    the last log was skipped)."""
    if math.isfinite(loss) or args.skip_nonfinite_steps:
        return
    raise UsageError(
        f"the training loss or gradient became {loss} by update {pos.update}. Lower --learning_rate (e.g. 1e-4), "
        "keep --max_grad_norm at 1.0 or lower, or raise --warmup_steps; no checkpoint was written from the bad "
        f"state: resume from the last good one with --resume_from_checkpoint latest (checkpoints in "
        f"{args.output_dir}), or pass --skip_nonfinite_steps to skip such updates")


def _save_checkpoint(t: Training, pos: Position) -> None:
    # Every process gathers (on a TPU pod, gathering sharded tensors is a collective); one writes.
    args, device, run_dir = t.args, t.device, t.run_dir
    model, state = device.for_saving(t.model), device.to_host(t.optimizer.state_dict())
    if not all(torch.isfinite(v).all() for s in state["state"].values() for v in s.values() if torch.is_tensor(v)):
        _check_finite(math.nan, pos, args)  # a non-finite update never becomes the latest checkpoint
    rng = device.rng_states()  # torchrun: every rank's dropout RNG, on rank 0
    if not device.is_main:
        return
    tmp = run_dir.begin_checkpoint(pos.update)
    if args.use_lora:
        minilora.save_adapter(model, tmp, base_model_name_or_path=args.model_name)
    else:
        from safetensors.torch import save_file

        save_file(trainable_state(model), os.path.join(tmp, "model.safetensors"))
    save_tensors_safely(state, os.path.join(tmp, "optimizer.pt"))
    save_tensors_safely(rng[0] if len(rng) == 1 else {"ranks": rng}, os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump({"update": pos.update, "epoch": pos.epoch, "micro": pos.micro,
                   "nonfinite_skipped": pos.nonfinite_skipped, "history": pos.history,
                   "settings": resume_settings(args, device.global_batch(1))}, f, indent=2)
    run_dir.commit_checkpoint(tmp, pos.update, args.save_total_limit)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


# -- finish -------------------------------------------------------------------------------------

def _save_final(run_dir: RunDir, model, tokenizer, device: Device, args: TrainArgs) -> None:
    model = device.for_saving(model)  # every process: see _save_checkpoint
    if not device.is_main:
        return
    if args.use_lora:
        minilora.save_adapter(model, run_dir.local, base_model_name_or_path=args.model_name)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            run_dir.publish(name)
    else:
        move_model(model, "cpu")  # the run is over; safetensors reads host memory (XLA storage has none)
        # Written aside, then each file renamed into place: a kill mid-save leaves no half-written
        # model.safetensors next to a previous run's files (train_summary.json comes last anyway).
        staging = run_dir.path(".final-model.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), run_dir.path(name))
            run_dir.publish(name)
        os.rmdir(staging)
    tokenizer.save_pretrained(run_dir.local)
    for name in os.listdir(run_dir.local):
        if "token" in name or name == "special_tokens_map.json":
            run_dir.publish(name)


def _size(path: str) -> Optional[int]:
    return os.path.getsize(path) if os.path.exists(path) else None
