"""``python -m train.bench`` (``minilora-bench``): minilora against PEFT and full fine-tuning.

Everything is measured in one run on one machine. Contenders alternate step by step (the order
rotating each round), so drift from other processes or the machine's state falls on all of them
alike; every figure is a median of those alternated samples, and every ratio is taken within the
run. Sections (``--only`` / ``--skip`` pick them):

    training    step time (forward, backward, AdamW) and peak memory: minilora LoRA, PEFT LoRA and
                full fine-tuning, LoRA at dropout 0 and 0.1; eager CPU, and CUDA when present
    inference   base forward vs minilora unmerged vs merged
    switching   set_adapter on a Llama-3.2-1B-shaped adapter set (random weights)
    xla         the training app's own loop on the XLA CPU device: compiles during and after
                warm-up, host fallbacks, steady-state update time vs the same loop on eager CPU
    packing     real tokens / all tokens of the data pipeline on ../shared/data/medquad.jsonl

It prints markdown (also ``--markdown PATH``) and writes every number to ``--json PATH``.
docs/benchmarks.md holds the latest full run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDQUAD = os.path.join(os.path.dirname(ROOT), "shared", "data", "medquad.jsonl")
SECTIONS = ("training", "inference", "switching", "xla", "packing")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- what is measured ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """The Llama that the training and inference sections run, and its batch."""

    layers: int = 6
    hidden: int = 512
    intermediate: int = 1376
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 8192
    batch: int = 4
    seq: int = 256
    r: int = 16
    alpha: int = 32


@dataclass
class Settings:
    shape: Shape = field(default_factory=Shape)
    dropouts: tuple = (0.0, 0.1)
    rounds: int = 7              # alternated samples per contender (training)
    warmup: int = 2              # untimed steps per contender first (the first allocates AdamW state)
    inference_rounds: int = 9
    memory_steps: int = 2        # steps per contender in its memory subprocess
    switch_adapters: int = 4     # adapters in the 1B-shaped set
    switch_rounds: int = 40
    xla_updates: int = 14        # updates of the XLA / eager loop runs (2 of them warm-up)
    packing_records: Optional[int] = None  # medquad records to pack (None: all)
    seed: int = 0


QUICK = dict(shape=Shape(layers=2, hidden=256, intermediate=688, heads=4, kv_heads=2, vocab=4096, batch=2, seq=128),
             rounds=3, warmup=1, inference_rounds=5, switch_adapters=2, switch_rounds=10, xla_updates=10,
             packing_records=2000)

# Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json), for the adapter switching section.
LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)

# Dense bf16 peak of accelerators, for model FLOPs utilisation (``--peak-tflops`` overrides).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "V100": 125.0,
               "T4": 65.0, "v6e": 918.0, "v5p": 459.0, "v5e": 197.0, "v5litepod": 197.0, "v4": 275.0}


# -- models and steps ---------------------------------------------------------------------------

def llama_config(shape: Shape):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.seq,
                       tie_word_embeddings=False)


def build_model(kind: str, dropout: float, shape: Shape, seed: int, device: torch.device, dtype=torch.float32):
    """``kind``: base (no adapter), minilora, peft or full. The same seed gives every contender
    the same base weights; LoRA contenders get the same r, alpha, dropout and targets."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    # Built where it runs: a 1B-shaped model's random init takes seconds on a GPU, minutes on a CPU.
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(shape)).to(dtype)
    if kind == "minilora":
        import minilora

        minilora.inject(model, r=shape.r, alpha=shape.alpha, dropout=dropout, target_modules=TARGET_MODULES)
    elif kind == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=shape.r, lora_alpha=shape.alpha, lora_dropout=dropout,
                                                           target_modules=TARGET_MODULES, bias="none"))
    return model.to(device)


class Trainer:
    """One contender's model, AdamW and batch; ``step()`` is one training update."""

    def __init__(self, kind: str, dropout: float, shape: Shape, seed: int, device: torch.device, dtype=torch.float32):
        self.model = build_model(kind, dropout, shape, seed, device, dtype).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=1e-4, weight_decay=0.01)
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(device)  # (B, L)

    def step(self) -> None:
        loss = self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def step_flops(kind: str, shape: Shape) -> float:
    """Model FLOPs of one training step: 2 per multiply-add in forward, twice that again in backward
    for full fine-tuning (input and weight gradients), once again for LoRA (input gradients only;
    the adapters' own products are counted too). Attention scores count as in the PaLM paper."""
    s = shape
    head = s.hidden // s.heads
    per_layer = s.hidden * (2 * s.hidden + 2 * s.kv_heads * head) + 3 * s.hidden * s.intermediate
    dense = s.layers * per_layer + s.vocab * s.hidden  # Linear weights, lm_head included
    lora = s.layers * s.r * sum(i + o for i, o in [(s.hidden, s.hidden)] * 2 + [(s.hidden, s.kv_heads * head)] * 2
                                + [(s.hidden, s.intermediate)] * 2 + [(s.intermediate, s.hidden)])
    tokens = s.batch * s.seq
    attention = 12 * s.layers * s.hidden * s.seq * tokens  # forward 4·l·h·L per token, backward twice that
    if kind == "full":
        return 6 * dense * tokens + attention
    return 4 * dense * tokens + 6 * lora * tokens + attention


# -- timing --------------------------------------------------------------------------------------

def alternate(contenders: dict[str, Callable[[], None]], rounds: int, warmup: int,
              sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each contender: ``warmup`` untimed calls each, then ``rounds`` rounds
    in which every contender runs once, the order rotating by one each round. Python's garbage
    collector is held off while timing so that it lands on no one contender."""
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for i in range(rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                sync()
                start = time.perf_counter()
                contenders[name]()
                sync()
                samples[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return samples


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def device_sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# -- section: training ---------------------------------------------------------------------------

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


def bench_training(settings: Settings, device: torch.device, threads: int, dtype=torch.float32) -> dict:
    shape = settings.shape
    rows = contenders(settings)
    trainers = {label: Trainer(kind, p, shape, settings.seed, device, dtype) for label, kind, p in rows}
    samples = alternate({label: t.step for label, t in trainers.items()}, settings.rounds, settings.warmup,
                        device_sync(device))
    tokens = shape.batch * shape.seq
    result = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": threads,
              "tokens_per_step": tokens, "rows": []}
    for label, kind, p in rows:
        row = {"label": label, "kind": kind, "dropout": p, **summary(samples[label]),
               "trainable_params": sum(x.numel() for x in trainers[label].model.parameters() if x.requires_grad)}
        row["tokens_per_second"] = tokens / row["median"]
        row["model_gflop_per_step"] = step_flops(kind, shape) / 1e9
        row["model_tflops"] = row["model_gflop_per_step"] / row["median"] / 1e3
        result["rows"].append(row)
    del trainers
    gc.collect()
    for row, memory in zip(result["rows"], peak_memory(settings, device, threads, dtype)):
        row.update(memory)
    if not has_peft():
        result["note"] = "PEFT is not installed (pip install peft): the PEFT contenders were skipped"
    return result


def peak_memory(settings: Settings, device: torch.device, threads: int, dtype) -> list[dict]:
    """Peak memory of each contender's training steps above what its built model already held.

    CPU: each contender in a fresh process, so that no other contender's freed memory is reused:
    after building the model and AdamW, the kernel's peak-RSS mark is reset to the current RSS
    (``5 > /proc/self/clear_refs``) and read back (VmHWM) after ``memory_steps`` steps; the
    difference is activations, gradients, optimizer state and allocator slack. The processes
    run side by side (memory does not depend on timing). CUDA: torch.cuda.max_memory_allocated
    over the same steps, in this process.
    """
    specs = [{"kind": kind, "dropout": p, "shape": dataclasses.asdict(settings.shape), "seed": settings.seed,
              "steps": settings.memory_steps, "threads": threads, "device": str(device),
              "dtype": str(dtype).replace("torch.", "")} for _, kind, p in contenders(settings)]
    if device.type == "cuda":
        return [measure_memory(spec) for spec in specs]
    children = [subprocess.Popen([sys.executable, "-m", "train.bench", "--memory-child", json.dumps(spec)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_child_env())
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
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(spec["steps"]):
            trainer.step()
        torch.cuda.synchronize()
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated() - before,
                "memory_method": "torch.cuda.max_memory_allocated during the steps, minus the built model's allocation"}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    except OSError:  # not Linux: the process's lifetime peak, which may still be the model build's
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        for _ in range(spec["steps"]):
            trainer.step()
        return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - before,
                "memory_method": "ru_maxrss growth during the steps (a lower bound: no peak-RSS reset here)"}
    before = _proc_status_bytes("VmRSS")
    for _ in range(spec["steps"]):
        trainer.step()
    return {"peak_memory_bytes": _proc_status_bytes("VmHWM") - before, "baseline_rss_bytes": before,
            "memory_method": f"a fresh process per contender; peak RSS (VmHWM, reset after building the model and "
                             f"AdamW) during {spec['steps']} steps, minus the RSS at that reset"}


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


# -- section: inference --------------------------------------------------------------------------

def bench_inference(settings: Settings, device: torch.device, dtype=torch.float32) -> dict:
    """Forward passes (eval, no grad) of the base model, minilora unmerged and minilora merged.
    The adapter's B is random, so the unmerged adapter really computes something."""
    import minilora

    shape = settings.shape
    models = {"base": build_model("base", 0.0, shape, settings.seed, device, dtype)}
    for name in ("unmerged", "merged"):
        model = build_model("minilora", 0.0, shape, settings.seed, device, dtype)
        g = torch.Generator().manual_seed(settings.seed + 1)
        with torch.no_grad():
            for key, p in minilora.lora_parameters(model):
                if key.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        if name == "merged":
            minilora.merge(model)
        models[name] = model.eval()
    models["base"].eval()
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(0)).to(device)

    def forward(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        return run

    samples = alternate({k: forward(m) for k, m in models.items()}, settings.inference_rounds, 1, device_sync(device))
    rows = {k: summary(v) for k, v in samples.items()}
    base = rows["base"]["median"]
    for row in rows.values():
        row["vs_base"] = row["median"] / base
    return {"device": str(device), "rows": rows}


# -- section: adapter switching ------------------------------------------------------------------

def bench_switching(settings: Settings) -> dict:
    """``set_adapter`` cycling through adapters of a Llama-3.2-1B-shaped model.

    The base model is built on the meta device (its 1.24B weights are never needed to switch);
    the adapters are real CPU tensors with random values: r=16 on the seven projections of all
    16 layers, 11.27M parameters per adapter. Also measured: one walk of the module tree to find
    the adapted Linears, the per-layer pointer swap alone (what set_adapter does once it has
    them), and that switching runs no tensor op and leaves every parameter object and storage
    as it was.
    """
    import minilora
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_32_1B))
    names = [f"adapter{i}" for i in range(settings.switch_adapters)]
    for name in names:
        minilora.inject(model, r=16, alpha=32, adapter_name=name)
    g = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        for _, layer in minilora.lora_modules(model):
            for adapter in layer.adapters.values():
                adapter.to_empty(device="cpu")  # real storage for the adapter only (its scale buffer too)
                adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) * 0.02)
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.02)
                adapter.scale.fill_(adapter.scaling)
    per_adapter = sum(p.numel() for _, p in minilora.lora_parameters(model, names[0]))

    def parameters():
        return [(n, id(p), p.data_ptr()) for n, p in model.named_parameters() if p.device.type != "meta"]

    class OpCounter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            OpCounter.ops += 1
            return func(*args, **(kwargs or {}))

    before = parameters()
    calls = []
    with OpCounter():
        for i in range(settings.switch_rounds):
            start = time.perf_counter()
            minilora.set_adapter(model, names[i % len(names)])
            calls.append(time.perf_counter() - start)
    unchanged = parameters() == before
    walks = []
    for _ in range(settings.switch_rounds):
        start = time.perf_counter()
        layers = [m for m in model.modules() if isinstance(m, minilora.LoRALinear)]
        walks.append(time.perf_counter() - start)
    swaps = []
    for i in range(settings.switch_rounds):
        start = time.perf_counter()
        for layer in layers:
            layer.active_adapter = names[i % len(names)]
        swaps.append(time.perf_counter() - start)
    return {"adapters": len(names), "params_per_adapter": per_adapter, "lora_layers": len(layers),
            "modules": sum(1 for _ in model.named_modules()),
            "set_adapter": summary(calls), "module_walk": summary(walks), "pointer_swap": summary(swaps),
            "tensor_ops_during_switch": OpCounter.ops, "parameters_unchanged": unchanged}


# -- section: the XLA loop -----------------------------------------------------------------------

LOOP_CHILD = """
import json, sys
from train.config import parse_args
from train.loop import run
summary = run(parse_args(json.loads(sys.argv[1])))
print(json.dumps({"xla": summary.get("xla"), "device": summary.get("device"), "updates": summary.get("updates")}))
"""


def bench_xla(settings: Settings, workdir: str, threads: int, tokenizer_dir: str, data_file: str,
              xla_device: str = "CPU", compare_eager: bool = True, compare_full: bool = True) -> dict:
    """The training app's loop (train.loop.run) in fresh processes, on an XLA device (by default
    the XLA CPU device, PJRT_DEVICE=CPU) and on eager CPU, with the same small model, data and
    settings (LoRA r=16 on the seven projections, dropout 0.1, 4 x 128 tokens, the loss read back
    every 4 updates, one evaluation at the start and one at the end)."""
    if importlib.util.find_spec("torch_xla") is None:
        return {"skipped": "torch_xla is not installed (pip install 'minilora[xla]')"}
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_dir = os.path.join(workdir, "xla-model")
    torch.manual_seed(settings.seed)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
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
        env = {**_child_env(), "PJRT_DEVICE": xla_device} if kind.startswith("xla") else _child_env()
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


# -- section: packing ----------------------------------------------------------------------------

def bench_packing(tokenizer_dir: str, data_file: str, workdir: str, lengths=(256, 2048)) -> dict:
    """Real tokens / all tokens of the windows train.data.load_windows packs (documents are
    concatenated, [bos] text [eos], so only a split's last window is padded)."""
    from transformers import AutoTokenizer

    from .data import load_windows

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = []
    for length in lengths:
        windows = load_windows(data_file, tokenizer, length, tmp_dir=workdir)
        total = windows.input_ids.numel()
        rows.append({"max_seq_length": length, "windows": len(windows), "real_tokens": windows.real_tokens,
                     "all_tokens": total, "efficiency": windows.real_tokens / total})
    return {"rows": rows}


def prepare_text(settings: Settings, medquad: str, workdir: str) -> tuple[str, str, str, str]:
    """(tokenizer dir, records to pack, the XLA section's training records, source note): a
    byte-level BPE (the embedded demo's kind, 8192 entries) trained on medquad's first 3000
    answers. Without medquad, generated sentences stand in and the figures say so."""
    from .demo_assets import train_tokenizer

    if os.path.exists(medquad):
        with open(medquad, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        source = f"{medquad} ({len(lines):,d} records)"
        if settings.packing_records is not None:
            lines = lines[:settings.packing_records]
            source = f"{medquad} (first {len(lines):,d} records)"
        texts = [json.loads(line)["answer"] for line in lines[:3000]]
    else:
        words = "patient fever cough insulin diabetes hypertension aspirin dose chronic acute renal therapy".split()
        texts = [f"The {words[i % 12]} was treated with {words[(i * 7) % 12]} therapy for {i % 30} days."
                 for i in range(3000)]
        lines = [json.dumps({"text": t}) + "\n" for t in texts]
        source = f"generated sentences ({medquad} not found)"
    data_file = os.path.join(workdir, "records.jsonl")
    with open(data_file, "w", encoding="utf-8") as f:
        f.writelines(lines)
    loop_file = os.path.join(workdir, "loop-records.jsonl")
    with open(loop_file, "w", encoding="utf-8") as f:
        f.writelines(lines[:600])  # the XLA section's training data: plenty for its few updates
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    train_tokenizer(texts, 8192, tokenizer_dir)
    return tokenizer_dir, data_file, loop_file, source


# -- targets ------------------------------------------------------------------------------------

def targets(results: dict) -> list[dict]:
    """Each target of the issue with the figure this run measured (None: not measured)."""
    rows = []

    def add(name, value, limit, better="lower", note=""):
        met = None if value is None else (value <= limit if better == "lower" else value >= limit)
        rows.append({"target": name, "value": value, "limit": limit, "better": better, "met": met, "note": note})

    # The training targets once per device measured (eager CPU, and CUDA where present).
    for device, training in (results.get("training") or {"cpu": {}}).items():
        on = "" if device == "cpu" else f" ({device})"
        step = {(r["kind"], r["dropout"]): r for r in training.get("rows", [])}
        for p, limit in ((0.0, 1.00), (0.1, 0.90)):
            ours, theirs = step.get(("minilora", p)), step.get(("peft", p))
            add(f"minilora / PEFT training step, dropout {p:g}{on}", ours and theirs and ours["median"] / theirs["median"],
                limit)
        ours, full = step.get(("minilora", 0.0)), step.get(("full", 0.0))
        add(f"minilora LoRA / full fine-tune step, dropout 0{on}", ours and full and ours["median"] / full["median"],
            0.55, note=ours and full and f"model FLOPs ratio {ours['model_gflop_per_step'] / full['model_gflop_per_step']:.3f}")
        for p in results.get("settings", {}).get("dropouts", ()):
            ours, theirs = step.get(("minilora", p)), step.get(("peft", p))
            value = ours and theirs and "peak_memory_bytes" in ours and ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]
            add(f"minilora / PEFT peak training memory, dropout {p:g}{on}", value or None, 1.00)
    inference = results.get("inference", {}).get("rows")
    add("merged inference / base forward", inference and inference["merged"]["vs_base"], 1.02,
        note=inference and f"unmerged / base {inference['unmerged']['vs_base']:.3f}")
    switching = results.get("switching")
    add("adapter switch, 1B-shaped set (ms)", switching and switching["set_adapter"]["median"] * 1e3, 1.0,
        note=switching and (f"the pointer swap alone {switching['pointer_swap']['median'] * 1e3:.3f} ms, one "
                            f"module-tree walk {switching['module_walk']['median'] * 1e3:.3f} ms; "
                            f"{switching['tensor_ops_during_switch']} tensor ops"))
    xla = results.get("xla") or {}
    add("XLA compiles after warm-up", xla.get("compiles_after_warmup"), 0)
    add("XLA aten:: fallbacks in the step", None if "fallbacks_in_step" not in xla else sum(xla["fallbacks_in_step"].values()), 0)
    packing = (results.get("packing") or {}).get("rows")
    add("packing: real tokens / all tokens", packing and min(r["efficiency"] for r in packing), 0.99, better="higher")
    return rows


# -- output -------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "peft", "torch_xla"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def _mib(value) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f}"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Run {results['started']} · `{results['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('memory_gib', '?')} GiB"
             + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
             + f" · torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, "
               f"peft {m['versions']['peft']}, torch_xla {m['versions']['torch_xla']}",
             f"Load average (1 min) at start {results['load_start']:.2f}, at end {results['load_end']:.2f}; "
             f"wall time {results['wall_seconds']:.0f} s", ""]
    for key, training in results.get("training", {}).items():
        s = results["settings"]["shape"]
        lines += [f"### Training step, {training['device']} ({training['dtype']}, {training['threads']} threads)", "",
                  f"Llama {s['layers']} layers, hidden {s['hidden']}, intermediate {s['intermediate']}, {s['heads']} heads, "
                  f"{s['kv_heads']} KV heads, vocab {s['vocab']}; batch {s['batch']} x {s['seq']} tokens; "
                  f"LoRA r={s['r']}, alpha={s['alpha']} on the seven projections; AdamW. "
                  f"Median of {results['settings']['rounds']} alternated steps per contender.", "",
                  "| contender | step (s) | min–max (s) | vs PEFT (same dropout) | vs full FT | tokens/s | model GFLOP/step "
                  "| peak memory (MiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        by = {(r["kind"], r["dropout"]): r for r in training["rows"]}
        full = by.get(("full", 0.0))
        for r in training["rows"]:
            peft_row = by.get(("peft", r["dropout"])) if r["kind"] != "full" else None
            vs_peft = f"{r['median'] / peft_row['median']:.3f}" if peft_row else "—"
            vs_full = f"{r['median'] / full['median']:.3f}" if full else "—"
            lines.append(f"| {r['label']} | {r['median']:.3f} | {r['min']:.3f}–{r['max']:.3f} | {vs_peft} | {vs_full} "
                         f"| {r['tokens_per_second']:,.0f} | {r['model_gflop_per_step']:.1f} "
                         f"| {_mib(r.get('peak_memory_bytes'))} |")
        if "mfu_peak_tflops" in training:
            lines += ["", "Model FLOPs utilisation (peak %.0f TFLOPS): " % training["mfu_peak_tflops"] + ", ".join(
                f"{r['label']} {100 * r['mfu']:.1f}%" for r in training["rows"])]
        if training.get("note"):
            lines += ["", training["note"]]
        method = next((r.get("memory_method") for r in training["rows"] if r.get("memory_method")), None)
        if method:
            lines += ["", f"Peak memory: {method}."]
        lines.append("")
    if "inference" in results:
        inf = results["inference"]["rows"]
        lines += ["### Inference (forward, eval, no grad)", "", "| path | forward (s) | vs base |", "|---|---|---|"]
        for name in ("base", "unmerged", "merged"):
            lines.append(f"| {name} | {inf[name]['median']:.3f} | {inf[name]['vs_base']:.3f} |")
        lines.append("")
    if "switching" in results:
        sw = results["switching"]
        lines += ["### Adapter switching (Llama-3.2-1B shape, base on the meta device)", "",
                  f"{sw['adapters']} adapters x {sw['params_per_adapter']:,d} parameters, {sw['lora_layers']} adapted "
                  f"Linears, {sw['modules']} modules in the tree.", "",
                  "| what | median (ms) |", "|---|---|",
                  f"| minilora.set_adapter(model, name) | {sw['set_adapter']['median'] * 1e3:.3f} |",
                  f"| one walk of model.modules() to find the adapted Linears | {sw['module_walk']['median'] * 1e3:.3f} |",
                  f"| the per-layer pointer swap alone | {sw['pointer_swap']['median'] * 1e3:.3f} |", "",
                  f"Tensor ops run while switching: {sw['tensor_ops_during_switch']}; parameter objects and storages "
                  f"unchanged: {sw['parameters_unchanged']}.", ""]
    if "xla" in results:
        x = results["xla"]
        if "skipped" in x:
            lines += ["### XLA loop", "", x["skipped"], ""]
        else:
            eager = x.get("eager_update_seconds")
            eager_cells = "— | —" if eager is None else f"{eager:.3f} | {x['xla_vs_eager']:.2f}"
            lines += [f"### The training loop on XLA ({x['xla_device']}) vs eager CPU", "",
                      f"train.loop.run on {x.get('source', 'text')}: a 2-layer Llama (hidden 128), LoRA r=16 dropout 0.1, "
                      f"4 x 128 tokens, {x['updates']} updates (2 of them warm-up), loss logged every "
                      f"{x['logging_steps']}.", "",
                      "| compiles (total) | compiles after warm-up | host reads after warm-up (designed) | "
                      "aten:: fallbacks in the step | XLA s/update | eager s/update | XLA / eager | XLA tokens/s |",
                      "|---|---|---|---|---|---|---|---|",
                      f"| {x['compiles_total']} | {x['compiles_after_warmup']} | "
                      f"{x['host_fallbacks_after_warmup'].get('aten::_local_scalar_dense', 0)} "
                      f"({x['designed_host_reads_after_warmup']}) | {sum(x['fallbacks_in_step'].values())} | "
                      f"{x['xla_update_seconds']:.3f} | {eager_cells} | {x['xla_tokens_per_second']:,.0f} |", ""]
            if "xla_full_update_seconds" in x:
                lines += [f"Full fine-tuning through the same loop on XLA: {x['xla_full_update_seconds']:.3f} s/update; "
                          f"LoRA / full on XLA {x['xla_lora_vs_full']:.2f}.", ""]
    if "packing" in results:
        lines += [f"### Packing ({results['packing']['source']})", "",
                  "| max_seq_length | windows | real tokens | all tokens | real / all |", "|---|---|---|---|---|"]
        for r in results["packing"]["rows"]:
            lines.append(f"| {r['max_seq_length']} | {r['windows']:,d} | {r['real_tokens']:,d} | {r['all_tokens']:,d} "
                         f"| {100 * r['efficiency']:.3f}% |")
        lines.append("")
    lines += ["### Targets", "", "| target | measured | target | met | note |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}" if isinstance(t["value"], float) else str(t["value"])
        sign = "≤" if t["better"] == "lower" else "≥"
        met = "—" if t["met"] is None else "yes" if t["met"] else "**no**"
        lines.append(f"| {t['target']} | {value} | {sign} {t['limit']} | {met} | {t['note'] or ''} |")
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------------

def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minilora-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small model and fewer rounds: about 1-2 minutes")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out")
    p.add_argument("--rounds", type=int, help="alternated training steps per contender (default 7, quick 3)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--json", default="minilora-bench.json", help="where to write every number")
    p.add_argument("--markdown", help="also write the markdown tables here")
    p.add_argument("--medquad", default=MEDQUAD, help="the packing section's data (JSON lines with 'answer')")
    p.add_argument("--shape", default="", help="Llama and batch overrides, e.g. layers=2,hidden=256,batch=2 "
                                                "(fields: " + ", ".join(f.name for f in dataclasses.fields(Shape)) + ")")
    p.add_argument("--devices", default="cpu,cuda",
                   help="devices of the training section, comma-separated (cuda only where present)")
    p.add_argument("--xla-device", default="CPU", help="PJRT_DEVICE of the XLA section: CPU, or TPU / CUDA where present")
    p.add_argument("--peak-tflops", type=float, help="accelerator peak for model FLOPs utilisation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    if args.memory_child:
        spec = json.loads(args.memory_child)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(measure_memory(spec)))
        return 0
    torch.set_num_threads(args.threads)
    settings = Settings(**QUICK) if args.quick else Settings()
    if args.rounds:
        settings.rounds = args.rounds
    if args.shape:
        try:
            changes = {k.strip(): int(v) for k, v in (item.split("=") for item in args.shape.split(","))}
            settings.shape = dataclasses.replace(settings.shape, **changes)
        except (ValueError, TypeError) as e:
            print(f"minilora-bench: error: --shape {args.shape}: {e}; give FIELD=INT pairs separated by commas",
                  file=sys.stderr)
            return 2
    settings.seed = args.seed
    wanted = [d.strip() for d in args.devices.split(",") if d.strip()]
    if set(wanted) - {"cpu", "cuda"}:
        print(f"minilora-bench: error: --devices {args.devices}: choose from cpu, cuda", file=sys.stderr)
        return 2
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS) | ({s for s in args.skip.split(",") if s} - set(SECTIONS))
    if unknown:
        print(f"minilora-bench: error: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    chosen = [s for s in chosen if s not in args.skip.split(",")]
    started = time.perf_counter()
    results: dict = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "command": " ".join(["python -m train.bench", *(argv if argv is not None else sys.argv[1:])]),
                     "machine": machine(), "load_start": os.getloadavg()[0],
                     "settings": {**dataclasses.asdict(settings), "threads": args.threads}, "sections": chosen}

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="minilora-bench-") as workdir:
        if "training" in chosen:
            results["training"] = {}
            devices = [torch.device(d) for d in wanted if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
            for device in devices:
                log(f"training on {device}")
                dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
                training = bench_training(settings, device, args.threads, dtype)
                peak = args.peak_tflops or (_known_peak(torch.cuda.get_device_name()) if device.type == "cuda" else None)
                if peak:
                    training["mfu_peak_tflops"] = peak
                    for row in training["rows"]:
                        row["mfu"] = row["model_tflops"] / peak
                results["training"][device.type] = training
        if "inference" in chosen:
            log("inference")
            results["inference"] = bench_inference(settings, torch.device("cpu"))
        if "switching" in chosen:
            log("adapter switching")
            results["switching"] = bench_switching(settings)
        if "xla" in chosen or "packing" in chosen:
            log("tokenizer")
            tokenizer_dir, data_file, loop_file, source = prepare_text(settings, args.medquad, workdir)
            if "packing" in chosen:
                log("packing")
                results["packing"] = {**bench_packing(tokenizer_dir, data_file, workdir), "source": source}
            if "xla" in chosen:
                log("XLA loop")
                results["xla"] = bench_xla(settings, workdir, args.threads, tokenizer_dir, loop_file, args.xla_device)
                results["xla"]["source"] = source
    results["load_end"] = os.getloadavg()[0]
    results["wall_seconds"] = time.perf_counter() - started
    results["targets"] = targets(results)
    text = markdown(results)
    print(text)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    log(f"done; numbers in {args.json}")
    return 0


def _known_peak(name: str) -> Optional[float]:
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key.lower() in name.lower()), None)


if __name__ == "__main__":
    sys.exit(main())
