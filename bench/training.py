"""Section ``training``: step time (forward, backward, AdamW) and peak memory of minilora LoRA,
PEFT LoRA and full fine-tuning, LoRA at each dropout; eager CPU, and CUDA when present."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import subprocess
import sys
from typing import Optional

import torch

from .models import Settings, Shape, Trainer, step_flops
from .timing import ROOT, alternate, child_env, device_sync, peak_memory_during, summary

# Dense bf16 peak of accelerators, for model FLOPs utilisation (``--peak-tflops`` overrides).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "V100": 125.0,
               "T4": 65.0, "v6e": 918.0, "v5p": 459.0, "v5e": 197.0, "v5litepod": 197.0, "v4": 275.0}


def contenders(settings: Settings) -> list[tuple[str, str, float]]:
    """(label, kind, dropout) in the order they alternate; PEFT only when installed."""
    out = []
    for p in settings.dropouts:
        out.append((f"minilora LoRA, dropout {p:g}", "minilora", p))
        if has_peft():
            out.append((f"PEFT LoRA, dropout {p:g}", "peft", p))
    out.append(("full fine-tuning", "full", 0.0))
    return out


def has_peft() -> bool:
    return importlib.util.find_spec("peft") is not None


def bench_training(settings: Settings, device: torch.device, threads: int, dtype=torch.float32,
                   peak_tflops: Optional[float] = None) -> dict:
    shape = settings.shape
    rows = contenders(settings)
    trainers = {label: Trainer(kind, p, shape, settings.seed, device, dtype) for label, kind, p in rows}
    samples = alternate({label: t.step for label, t in trainers.items()}, settings.rounds, settings.warmup,
                        device_sync(device))
    tokens = shape.batch * shape.seq
    result = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": threads,
              "tokens_per_step": tokens, "rows": []}
    peak = peak_tflops or (known_peak(torch.cuda.get_device_name()) if device.type == "cuda" else None)
    if peak:
        result["mfu_peak_tflops"] = peak
    for label, kind, p in rows:
        row = {"label": label, "kind": kind, "dropout": p, **summary(samples[label]),
               "trainable_params": sum(x.numel() for x in trainers[label].model.parameters() if x.requires_grad)}
        row["tokens_per_second"] = tokens / row["median"]
        row["model_gflop_per_step"] = step_flops(kind, shape) / 1e9
        row["model_tflops"] = row["model_gflop_per_step"] / row["median"] / 1e3
        if peak:
            row["mfu"] = row["model_tflops"] / peak
        result["rows"].append(row)
    del trainers
    gc.collect()
    for row, memory in zip(result["rows"], peak_memory(settings, device, threads, dtype)):
        row.update(memory)
    if not has_peft():
        result["note"] = "PEFT is not installed (pip install peft): the PEFT contenders were skipped"
    return result


def known_peak(name: str) -> Optional[float]:
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key.lower() in name.lower()), None)


def peak_memory(settings: Settings, device: torch.device, threads: int, dtype) -> list[dict]:
    """Peak memory of each contender's training steps above what its built model already held
    (activations, gradients, optimizer state and allocator slack; see timing.peak_memory_during).

    CPU: each contender in a fresh process, so that no other contender's freed memory is reused;
    the processes run side by side (memory does not depend on timing). CUDA: in this process.
    """
    specs = [{"kind": kind, "dropout": p, "shape": dataclasses.asdict(settings.shape), "seed": settings.seed,
              "steps": settings.memory_steps, "threads": threads, "device": str(device),
              "dtype": str(dtype).replace("torch.", "")} for _, kind, p in contenders(settings)]
    if device.type == "cuda":
        return [measure_memory(spec) for spec in specs]
    children = [subprocess.Popen([sys.executable, "-m", "bench", "--memory-child", json.dumps(spec)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=child_env())
                for spec in specs]
    out = []
    for spec, child in zip(specs, children):
        stdout, stderr = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"the memory subprocess for {spec['kind']} (dropout {spec['dropout']}) failed:\n{stderr[-3000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def measure_memory(spec: dict) -> dict:
    """The child's side of peak_memory (also run in-process for CUDA)."""
    device = torch.device(spec["device"])
    trainer = Trainer(spec["kind"], spec["dropout"], Shape(**spec["shape"]), spec["seed"], device,
                      getattr(torch, spec["dtype"]))

    def steps():
        for _ in range(spec["steps"]):
            trainer.step()

    return peak_memory_during(steps, device)
