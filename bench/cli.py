"""``minilora-bench`` / ``python -m minilora_bench``: parse the command line, run the chosen sections, write the report."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from typing import Optional

import torch

from . import __doc__ as PACKAGE_DOC
from .loop import LOOP_ROWS
from .models import QUICK, SHAPES, Settings, Shape, parse_shape
from .report import machine, markdown, targets
from .timing import ROOT, keep_off_xla

MEDQUAD = os.path.join(os.path.dirname(ROOT), "shared", "data", "medquad.jsonl")
SECTIONS = ("training", "speed", "gguf", "inference", "switching", "multi", "loop", "xla", "packing")


class UsageError(ValueError):
    """A bad command line: one line on stderr, exit status 2."""


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minilora-bench", description=PACKAGE_DOC.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small model and fewer rounds: about 1-2 minutes")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out")
    p.add_argument("--rounds", type=int, help="alternated training steps per contender (default 7, quick 3)")
    p.add_argument("--warmup", type=int, help="untimed steps per contender before the rounds (default 2, quick 1)")
    p.add_argument("--memory-steps", type=int,
                   help="steps of each training contender's peak-memory subprocess (default 2; 0: no memory column)")
    p.add_argument("--loop-rows", help=f"the loop section's contenders, comma-separated (default all: {', '.join(LOOP_ROWS)})")
    p.add_argument("--loop-updates", type=int, help="updates per loop-section run, 2 of them warm-up (default 8, at least 4)")
    p.add_argument("--loop-rounds", type=int, help="runs of each loop-section contender (default 2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--json", default="minilora-bench.json", help="where to write every number")
    p.add_argument("--markdown", help="also write the markdown tables here")
    p.add_argument("--medquad", default=MEDQUAD, help="the packing section's data (JSON lines with 'answer')")
    p.add_argument("--shape", default="",
                   help=f"a named shape ({', '.join(SHAPES)}) and/or Llama and batch overrides, e.g. "
                        f"layers=2,hidden=256,batch=2 (fields: {', '.join(f.name for f in dataclasses.fields(Shape))})")
    p.add_argument("--multi-shape", default="",
                   help="the multi section's shape, as --shape (default smollm2-135m), e.g. smollm2-135m,layers=8")
    p.add_argument("--devices", default="cpu,cuda",
                   help="devices of the training, multi and loop sections, comma-separated (cuda only where present)")
    p.add_argument("--xla-device", default="CPU", help="PJRT_DEVICE of the XLA section: CPU, or TPU / CUDA where present")
    p.add_argument("--peak-tflops", type=float, help="accelerator peak for model FLOPs utilisation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def configure(args: argparse.Namespace) -> tuple[Settings, list[str], list[torch.device]]:
    """(settings, sections, training devices) from the command line; UsageError on bad input."""
    settings = Settings(**QUICK) if args.quick else Settings()
    for name in ("rounds", "warmup", "memory_steps", "loop_updates", "loop_rounds"):
        value = getattr(args, name)
        if value is not None:
            least = {"rounds": 1, "loop_updates": 4, "loop_rounds": 1}.get(name, 0)
            if value < least:
                raise UsageError(f"--{name.replace('_', '-')} {value}: give at least {least}")
            setattr(settings, name, value)
    if args.loop_rows:
        rows = tuple(r.strip() for r in args.loop_rows.split(",") if r.strip())
        if not rows or set(rows) - set(LOOP_ROWS):
            raise UsageError(f"--loop-rows {args.loop_rows}: choose from {', '.join(LOOP_ROWS)}")
        settings.loop_rows = rows
    for field in ("shape", "multi_shape"):  # --shape, --multi-shape
        text = getattr(args, field)
        if text:
            try:
                setattr(settings, field, parse_shape(text, getattr(settings, field)))
            except ValueError as e:
                raise UsageError(f"--{field.replace('_', '-')} {text}: {e}; give a shape name and/or FIELD=INT pairs "
                                 "separated by commas") from None
    settings.seed = args.seed
    wanted = [d.strip() for d in args.devices.split(",") if d.strip()]
    if set(wanted) - {"cpu", "cuda"}:
        raise UsageError(f"--devices {args.devices}: choose from cpu, cuda")
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = (set(chosen) | skipped) - set(SECTIONS)
    if unknown:
        raise UsageError(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    devices = [torch.device(d) for d in wanted if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    return settings, [s for s in chosen if s not in skipped], devices


def run_sections(settings: Settings, chosen: list[str], devices: list[torch.device], args: argparse.Namespace,
                 log) -> dict:
    """Each chosen section's results, keyed by section."""
    from .gguf import bench_gguf
    from .inference import bench_inference, bench_switching
    from .loop import bench_loop
    from .multi import bench_multi
    from .packing import bench_packing, prepare_text
    from .training import bench_speed, bench_training
    from .xla import bench_xla

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="minilora-bench-") as workdir:
        if "training" in chosen:
            results["training"] = {}
            for device in devices:
                log(f"training on {device}")
                dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
                results["training"][device.type] = bench_training(settings, device, args.threads, dtype,
                                                                  args.peak_tflops)
        if "speed" in chosen:
            log("minilora's step by precision and depth")
            results["speed"] = bench_speed(settings, args.threads)
        if "gguf" in chosen:
            log("minilora's step on a GGUF file's own blocks")
            results["gguf"] = bench_gguf(settings, args.threads)
        if "inference" in chosen:
            log("inference")
            results["inference"] = bench_inference(settings, torch.device("cpu"))
        if "switching" in chosen:
            log("adapter switching")
            results["switching"] = bench_switching(settings)
        if "multi" in chosen:
            for device in devices:  # "multi" on the CPU, "multi_cuda" on a GPU (bfloat16 base, as training)
                log(f"many adapters in one batch on {device}")
                dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
                results["multi" if device.type == "cpu" else f"multi_{device.type}"] = bench_multi(settings, device, dtype)
        if {"xla", "packing", "loop"} & set(chosen):
            log("tokenizer")
            tokenizer_dir, data_file, loop_file, source = prepare_text(settings, args.medquad, workdir)
            if "packing" in chosen:
                log("packing")
                results["packing"] = {**bench_packing(tokenizer_dir, data_file, workdir), "source": source}
            if "loop" in chosen:
                for device in devices:  # "loop" on the CPU, "loop_cuda" on a GPU
                    log(f"the app's loop vs a bare loop on {device}")
                    results["loop" if device.type == "cpu" else f"loop_{device.type}"] = bench_loop(
                        settings, workdir, args.threads, tokenizer_dir, loop_file, device=device.type)
            if "xla" in chosen:
                log("XLA loop")
                results["xla"] = bench_xla(settings, workdir, args.threads, tokenizer_dir, loop_file, args.xla_device)
                results["xla"]["source"] = source
    return results


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    keep_off_xla()
    if args.memory_child:  # one contender's peak memory, in a fresh process (see training.peak_memory)
        from .training import measure_memory

        spec = json.loads(args.memory_child)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(measure_memory(spec)))
        return 0
    try:
        settings, chosen, devices = configure(args)
    except UsageError as e:
        print(f"minilora-bench: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    results: dict = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "command": " ".join(["minilora-bench", *(argv if argv is not None else sys.argv[1:])]),
                     "machine": machine(), "load_start": os.getloadavg()[0],
                     "settings": {**dataclasses.asdict(settings), "threads": args.threads}, "sections": chosen}
    results.update(run_sections(settings, chosen, devices, args, log))
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
