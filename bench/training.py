"""Section ``training``: step time (forward, backward, AdamW) and peak memory of minilora LoRA,
PEFT LoRA and full fine-tuning, LoRA at each dropout (on a CPU, minilora's dropout by both of its
mask paths); eager CPU, and CUDA when present. Section ``speed``: minilora's step at the
precisions and depths the training app offers (float32, bfloat16 autocast, bfloat16 weights; all
layers or the top 8)."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import subprocess
import sys
from typing import Optional

import torch

from .models import MASK_PATHS, Settings, Shape, Trainer, native_mask_path, step_flops
from .timing import ROOT, alternate, child_env, device_sync, peak_memory_during, summary

# Dense bf16 peak of accelerators, for model FLOPs utilisation (``--peak-tflops`` overrides).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "V100": 125.0,
               "T4": 65.0, "v6e": 918.0, "v5p": 459.0, "v5e": 197.0, "v5litepod": 197.0, "v4": 275.0}


def contenders(settings: Settings, device: torch.device = torch.device("cpu")) -> list[dict]:
    """{label, kind, dropout, mask} in the order they alternate; PEFT only when installed. On a CPU,
    minilora with dropout runs once per mask path (models.MASK_PATHS), this machine's own first,
    so that one run measures dropout's cost on AMD's path and Intel's alike."""
    out = []
    for p in settings.dropouts:
        paths = [None]
        if p > 0 and device.type == "cpu":
            own = native_mask_path()
            paths = [own] + [m for m in MASK_PATHS if m != own]
        for mask in paths:
            label = f"minilora LoRA, dropout {p:g}" + ("" if mask is None else f" ({MASK_LABELS[mask]} mask)")
            out.append({"label": label, "kind": "minilora", "dropout": p, "mask": mask})
        if has_peft():
            out.append({"label": f"PEFT LoRA, dropout {p:g}", "kind": "peft", "dropout": p, "mask": None})
    out.append({"label": "full fine-tuning", "kind": "full", "dropout": 0.0, "mask": None})
    return out


MASK_LABELS = {"words": "16-bit-word", "bernoulli": "bernoulli_"}


def has_peft() -> bool:
    return importlib.util.find_spec("peft") is not None


def bench_training(settings: Settings, device: torch.device, threads: int, dtype=torch.float32,
                   peak_tflops: Optional[float] = None) -> dict:
    shape = settings.shape
    rows = contenders(settings, device)
    trainers = {c["label"]: Trainer(c["kind"], c["dropout"], shape, settings.seed, device, dtype, mask=c["mask"])
                for c in rows}
    samples = alternate({label: t.step for label, t in trainers.items()}, settings.rounds, settings.warmup,
                        device_sync(device))
    tokens = shape.batch * shape.seq
    result = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": threads,
              "tokens_per_step": tokens, "rows": []}
    peak = peak_tflops or (known_peak(torch.cuda.get_device_name()) if device.type == "cuda" else None)
    if peak:
        result["mfu_peak_tflops"] = peak
    for c in rows:
        label = c["label"]
        row = {**c, **summary(samples[label]),
               "trainable_params": sum(x.numel() for x in trainers[label].model.parameters() if x.requires_grad)}
        if c["mask"] == native_mask_path():
            row["native_mask"] = True  # the path this machine takes by itself
        row["tokens_per_second"] = tokens / row["median"]
        row["model_gflop_per_step"] = step_flops(c["kind"], shape) / 1e9
        row["model_tflops"] = row["model_gflop_per_step"] / row["median"] / 1e3
        if peak:
            row["mfu"] = row["model_tflops"] / peak
        result["rows"].append(row)
    del trainers
    gc.collect()
    if settings.memory_steps > 0:
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
    two processes at a time (memory does not depend on timing, but a real model's steps take
    gigabytes each, and several side by side would exhaust the machine). CUDA: in this process.
    """
    specs = [{"kind": c["kind"], "dropout": c["dropout"], "mask": c["mask"], "shape": dataclasses.asdict(settings.shape),
              "seed": settings.seed, "steps": settings.memory_steps, "threads": threads, "device": str(device),
              "dtype": str(dtype).replace("torch.", "")} for c in contenders(settings, device)]
    if device.type == "cuda":
        return [measure_memory(spec) for spec in specs]
    out = []
    for pair in (specs[i:i + 2] for i in range(0, len(specs), 2)):
        children = [subprocess.Popen([sys.executable, "-m", "bench", "--memory-child", json.dumps(spec)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=child_env()) for spec in pair]
        for spec, child in zip(pair, children):
            stdout, stderr = child.communicate()
            if child.returncode != 0:
                raise RuntimeError(f"the memory subprocess for {spec['kind']} (dropout {spec['dropout']}) failed:\n"
                                   f"{stderr[-3000:]}")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def measure_memory(spec: dict) -> dict:
    """The child's side of peak_memory (also run in-process for CUDA)."""
    device = torch.device(spec["device"])
    trainer = Trainer(spec["kind"], spec["dropout"], Shape(**spec["shape"]), spec["seed"], device,
                      getattr(torch, spec["dtype"]), mask=spec.get("mask"))

    def steps():
        for _ in range(spec["steps"]):
            trainer.step()

    return peak_memory_during(steps, device)


SPEED_TOP_LAYERS = 8  # the demo's --lora_top_layers


def speed_rows(shape: Shape) -> list[tuple[str, torch.dtype, bool, int]]:
    """The speed section's contenders: (label, base weights' dtype, bfloat16 autocast, adapted top
    layers, 0 for all); minilora LoRA at dropout 0 (docs/benchmarks.md, "Speed by precision and
    depth"). "Top" is the demo's 8 layers, or half the layers of a smaller model."""
    top = min(SPEED_TOP_LAYERS, max(1, shape.layers // 2))
    return [(f"{precision}, {depth}", dtype, autocast, layers)
            for depth, layers in (("all layers", 0), (f"top {top} layers", top))
            for precision, dtype, autocast in (("float32", torch.float32, False),
                                               ("bfloat16 autocast", torch.float32, True),
                                               ("bfloat16 weights", torch.bfloat16, False))]


def bench_speed(settings: Settings, threads: int) -> dict:
    """minilora LoRA (dropout 0) on eager CPU at each of speed_rows, alternated as the training
    section does: seconds per update and each row's ratio to float32 on all layers. bfloat16
    pays only where the CPU has native bfloat16 instructions (``bf16_native``: the training
    app's test, avx512_bf16 or amx_bf16 in /proc/cpuinfo)."""
    from minilora_train.device import cpu_has_native_bf16

    shape = settings.shape
    device = torch.device("cpu")
    contenders = speed_rows(shape)
    trainers = {label: Trainer("minilora", 0.0, shape, settings.seed, device, dtype, autocast=autocast, top_layers=top)
                for label, dtype, autocast, top in contenders}
    samples = alternate({label: t.step for label, t in trainers.items()}, settings.rounds, settings.warmup)
    reference = summary(samples[contenders[0][0]])["median"]
    rows = []
    for label, dtype, autocast, top in contenders:
        row = {"label": label, "weights": str(dtype).replace("torch.", ""), "autocast_bf16": autocast,
               "top_layers": top or shape.layers, **summary(samples[label])}
        row["vs_float32_all_layers"] = row["median"] / reference
        rows.append(row)
    return {"rows": rows, "threads": threads, "tokens_per_step": shape.batch * shape.seq, "dropout": 0.0,
            "bf16_native": cpu_has_native_bf16()}
