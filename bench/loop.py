"""Section ``loop``: the training app's own loop (``minilora_train.loop.run``, eager CPU or CUDA) against a
bare loop over the same model, batch shape and AdamW: update time and whole-process peak memory,
the app as it runs by default (the chunked loss) and with full logits, torch.compile or glibc's
mmap threshold fixed."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from .models import Settings

# The contenders, by the name Settings.loop_rows (and --loop-rows) uses: (row label, the app's extra
# arguments, None for the bare loop; extra environment). Two memory-for-time trades the app leaves
# to the user (docs/benchmarks.md, "Where the app's extra memory went"): "app-trim", glibc's
# malloc_trim(0) after each update (MINILORA_MALLOC_TRIM=1, minilora_train.device); "app-mmap", glibc's mmap
# threshold fixed at 64 KiB, so that every freed activation goes back to the kernel on free.
MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}
LOOP_ROWS = {"app": ("app (the default: chunked loss)", [], {}),
             "app-full": ("app, --no-chunked_loss (full logits)", ["--no-chunked_loss"], {}),
             "app-trim": ("app, MINILORA_MALLOC_TRIM=1", [], {"MINILORA_MALLOC_TRIM": "1"}),
             "app-mmap": ("app, MALLOC_MMAP_THRESHOLD_=65536", [], MMAP_THRESHOLD),
             "app-compile": ("app, --compile", ["--compile"], {}),
             "bare": ("bare loop", None, {})}
from .timing import ROOT, child_env
from .xla import save_loop_model, steady_update_seconds

# The app, in a fresh process: its summary and the process's peak RSS.
APP_CHILD = """
import json, sys
from minilora_train.config import parse_args
from minilora_train.loop import run
from minilora_bench.timing import proc_status_bytes, usage
from minilora_train.device import use_torch_layers
summary = run(parse_args(json.loads(sys.argv[1])))
print(json.dumps({"peak_rss_bytes": proc_status_bytes("VmHWM"), "updates": summary["updates"],
                  "peak_device_bytes": summary.get("peak_memory_bytes"),  # None on the CPU
                  "compile": summary.get("compile"), **usage()}))
"""

# The bare loop, in a fresh process: the same model folder, LoRA settings, batch shape, device,
# base dtype (bfloat16 on CUDA, as the app's --bf16), AdamW and learning rate; transformers' own
# loss (model(labels=)); nothing else.
BARE_CHILD = """
import json, statistics, sys, time
import torch
import minilora
from transformers import AutoModelForCausalLM
from minilora_bench.timing import proc_status_bytes, usage
from minilora_train.device import use_torch_layers
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
torch.manual_seed(spec["seed"])
device = torch.device(spec["device"])
cuda = device.type == "cuda"
model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.bfloat16 if cuda else torch.float32)
use_torch_layers(model)  # as the app does: transformers' own layers, not Hub kernels, on every device
model.to(device)
minilora.inject(model, r=spec["r"], alpha=2 * spec["r"], dropout=spec["dropout"])
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
ids = torch.randint(0, spec["tokens"], (spec["batch"], spec["seq"]), device=device)
times = []
for update in range(spec["updates"]):
    started = time.perf_counter()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()  # the update's kernels done before its time is read
    times.append(time.perf_counter() - started)
print(json.dumps({"peak_rss_bytes": proc_status_bytes("VmHWM"), "update_seconds": statistics.median(times[2:]),
                  "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None, **usage()}))
"""


def bench_loop(settings: Settings, workdir: str, threads: int, tokenizer_dir: str, data_file: str,
               dropout: float = 0.05, r: int = 16, device: str = "cpu") -> dict:
    """Runs the contenders of ``settings.loop_rows`` (see LOOP_ROWS) in fresh processes, one after
    another, ``settings.loop_rounds`` times in rotating order; each figure is the median over
    rounds, each ratio to the bare loop (when it ran). ``device``: "cpu" (eager, float32) or
    "cuda" (the base in bfloat16, the app's --bf16; memory is the GPU's peak allocation, and the
    RSS figures are the host's)."""
    shape = settings.shape
    model_dir = save_loop_model(shape, tokenizer_dir, os.path.join(workdir, "loop-model"), settings.seed)
    updates = settings.loop_updates
    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    app_argv = ["--model_name", model_dir, "--dataset_dir", data_file, "--use_lora", "--lora_r", str(r),
                "--lora_dropout", str(dropout), "--max_seq_length", str(shape.seq),
                "--per_device_train_batch_size", str(shape.batch), "--per_device_eval_batch_size", str(shape.batch),
                "--max_steps", str(updates), "--logging_steps", "1", "--device", device, "--report_to", "none",
                "--save_epoch_percentage", "0", "--general_eval_dataset", "none", "--max_eval_samples",
                str(shape.batch), "--learning_rate", "1e-4", "--overwrite_output_dir", "--seed", str(settings.seed)]
    if device == "cuda":
        app_argv.append("--bf16")
    unknown = set(settings.loop_rows) - set(LOOP_ROWS)
    if unknown:
        raise ValueError(f"unknown loop row(s) {', '.join(sorted(unknown))}; choose from {', '.join(LOOP_ROWS)}")
    contenders = {LOOP_ROWS[key][0]: LOOP_ROWS[key][1:] for key in settings.loop_rows}
    samples: dict[str, list[dict]] = {name: [] for name in contenders}
    names = list(contenders)
    rounds = settings.loop_rounds
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            extra, more_env = contenders[name]
            env = {**child_env(), "OMP_NUM_THREADS": str(threads), **more_env}
            if extra is None:
                spec = {"model_dir": model_dir, "r": r, "dropout": dropout, "batch": shape.batch, "seq": shape.seq,
                        "tokens": tokens, "updates": updates, "threads": threads, "seed": settings.seed,
                        "device": device}
                result = _child(BARE_CHILD, spec, env)
            else:
                out = os.path.join(workdir, "loop-app")
                result = _child(APP_CHILD, app_argv + ["--output_dir", out] + extra, env)
                result["update_seconds"] = steady_update_seconds(os.path.join(out, "metrics.jsonl"))
            samples[name].append(result)
    rows = {name: {"update_seconds": statistics.median(s["update_seconds"] for s in runs),
                   "peak_rss_bytes": statistics.median(s["peak_rss_bytes"] for s in runs),
                   # the whole process's (start-up included): what the allocator's page faults cost
                   "system_seconds": statistics.median(s["system_seconds"] for s in runs),
                   "minor_faults": statistics.median(s["minor_faults"] for s in runs),
                   # the training memory: the GPU's peak allocation on CUDA, the process's peak RSS on the CPU
                   "peak_bytes": statistics.median(s["peak_device_bytes"] if device == "cuda" else s["peak_rss_bytes"]
                                                   for s in runs),
                   "samples": runs} for name, runs in samples.items()}
    bare = rows.get(LOOP_ROWS["bare"][0])
    for row in rows.values():
        row["time_vs_bare"] = bare and row["update_seconds"] / bare["update_seconds"]
        row["rss_vs_bare"] = bare and row["peak_rss_bytes"] / bare["peak_rss_bytes"]
        row["memory_vs_bare"] = bare and row["peak_bytes"] / bare["peak_bytes"]
    return {"rows": rows, "updates": updates, "rounds": rounds, "dropout": dropout, "r": r, "threads": threads,
            "vocab": max(shape.vocab, tokens), "batch": shape.batch, "seq": shape.seq, "device": device}


def _child(script: str, arg, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(arg)], capture_output=True, text=True, cwd=ROOT,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"a loop-section subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
