"""Section ``xla``: the training app's own loop (minilora_train.loop.run) on the XLA CPU device: compiles
during and after warm-up, host fallbacks, steady-state update time vs the same loop on eager CPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time

import torch

from .models import Settings, Shape, llama_config
from .timing import ROOT, child_env

# The loop's model: a 2-layer Llama (the vocabulary is the tokenizer's)
LOOP_SHAPE = Shape(layers=2, hidden=128, intermediate=344, heads=4, kv_heads=2, seq=128, batch=4)


def save_loop_model(shape: Shape, tokenizer_dir: str, model_dir: str, seed: int) -> str:
    """A random Llama of ``shape`` with the tokenizer's special tokens, saved with the tokenizer as
    a model folder the training app loads. Its vocabulary is ``shape.vocab`` rows when that is
    larger than the tokenizer's (the LM head then costs what the real model's does; the extra rows
    are never a label), else the tokenizer's."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = llama_config(dataclasses.replace(shape, vocab=max(shape.vocab, len(tokenizer))), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


LOOP_CHILD = """
import json, sys
from minilora_train.config import parse_args
from minilora_train.loop import run
summary = run(parse_args(json.loads(sys.argv[1])))
print(json.dumps({"xla": summary.get("xla"), "device": summary.get("device"), "updates": summary.get("updates")}))
"""


def bench_xla(settings: Settings, workdir: str, threads: int, tokenizer_dir: str, data_file: str,
              xla_device: str = "CPU", compare_eager: bool = True, compare_full: bool = True) -> dict:
    """The training app's loop (minilora_train.loop.run) in fresh processes, on an XLA device (by default
    the XLA CPU device, PJRT_DEVICE=CPU) and on eager CPU, with the same small model, data and
    settings (LoRA r=16 on the seven projections, dropout 0.1, 4 x 128 tokens, the loss read back
    every 4 updates, one evaluation at the start and one at the end)."""
    if importlib.util.find_spec("torch_xla") is None:
        return {"skipped": "torch_xla is not installed (pip install 'minilora[xla]')"}
    model_dir = save_loop_model(LOOP_SHAPE, tokenizer_dir, os.path.join(workdir, "xla-model"), settings.seed)
    log_every, updates = 4, settings.xla_updates
    runs = {}
    # xla-full: full fine-tuning through the same loop on XLA, for LoRA / full on the XLA device
    for kind in ["xla"] + ["xla-full"] * compare_full + ["cpu"] * compare_eager:
        out = os.path.join(workdir, f"loop-{kind}")
        method = [] if kind == "xla-full" else ["--use_lora", "--lora_r", "16", "--lora_dropout", "0.1"]
        argv = ["--model_name", model_dir, "--dataset_dir", data_file, "--output_dir", out, *method,
                "--max_seq_length", "128",
                "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_steps", str(updates),
                "--logging_steps", str(log_every), "--device", kind.split("-")[0], "--report_to", "none",
                "--save_epoch_percentage", "0", "--general_eval_dataset", "none", "--max_eval_samples", "8",
                "--overwrite_output_dir", "--seed", str(settings.seed)]
        env = {**child_env(), "PJRT_DEVICE": xla_device} if kind.startswith("xla") else child_env()
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", LOOP_CHILD, json.dumps(argv)], capture_output=True, text=True,
                              cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the {kind} training loop failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["wall_seconds"] = time.perf_counter() - started
        result["update_seconds"] = steady_update_seconds(os.path.join(out, "metrics.jsonl"))
        runs[kind] = result
    xla = runs["xla"]["xla"]
    fallbacks = dict(xla["host_fallbacks_after_warmup"])
    # The loop's own host reads after warm-up (update 2): each logged loss and one per evaluated set
    # (validation only here) in the final evaluation; any other read is inside the step.
    logged = sum(1 for u in range(3, updates + 1) if u % log_every == 0 or u == updates)
    designed = logged + 1
    reads = fallbacks.pop("aten::_local_scalar_dense", 0)
    in_step = {**fallbacks, **({"aten::_local_scalar_dense": reads - designed} if reads != designed else {})}
    result = {"updates": updates, "logging_steps": log_every, "threads": threads,
              "compiles_total": xla["compiles_total"], "compiles_after_warmup": xla["compiles_after_warmup"],
              "host_fallbacks_after_warmup": xla["host_fallbacks_after_warmup"],
              "designed_host_reads_after_warmup": designed, "fallbacks_in_step": in_step,
              "xla_device": runs["xla"]["device"], "xla_update_seconds": runs["xla"]["update_seconds"],
              "xla_wall_seconds": runs["xla"]["wall_seconds"],
              "xla_tokens_per_second": 4 * 128 / runs["xla"]["update_seconds"]}
    if compare_full:
        result.update({"xla_full_update_seconds": runs["xla-full"]["update_seconds"],
                       "xla_lora_vs_full": runs["xla"]["update_seconds"] / runs["xla-full"]["update_seconds"]})
    if compare_eager:
        result.update({"eager_update_seconds": runs["cpu"]["update_seconds"],
                       "xla_vs_eager": runs["xla"]["update_seconds"] / runs["cpu"]["update_seconds"],
                       "eager_wall_seconds": runs["cpu"]["wall_seconds"]})
    return result


def steady_update_seconds(metrics_path: str) -> float:
    """Seconds per update between the first logged update after warm-up and the last one."""
    with open(metrics_path) as f:
        logs = [json.loads(line) for line in f if line.strip()]
    logs = [m for m in logs if "train_loss" in m and m["update"] > 2]
    first, last = logs[0], logs[-1]
    return (last["time"] - first["time"]) / max(1, last["update"] - first["update"])
