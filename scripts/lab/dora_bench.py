"""DoRA training-step time and memory: minilora's ``use_dora=True`` against PEFT's, plus plain
minilora LoRA for reference, on a randomly initialised Llama.

    python scripts/lab/dora_bench.py --threads 1
    python scripts/lab/dora_bench.py --device cuda --dtype bfloat16 --shape layers=16,hidden=2048,...

Method (the same as the project benchmark's training section): all contenders are built first;
each runs 2 untimed warm-up steps, then ``--rounds`` rounds in which every contender runs one step,
the order rotating by one each round; the table gives medians and ratios within the run. The step
is ``model(ids, labels=ids).loss.backward()``, ``AdamW.step()``, ``zero_grad(set_to_none=True)``.

Memory, two ways:
  * saved for backward: the bytes of the tensors autograd saved in the forward pass that are still
    held when backward starts (parameters excluded, each storage counted once). Exact and
    machine-independent: it is what the implementation chooses to keep.
  * peak: on CPU, a fresh process per contender; after building the model and optimizer the
    kernel's peak-RSS mark is reset to the current RSS, and the peak minus that RSS after 2 steps
    is reported (activations, gradients, optimizer state, allocator slack). On CUDA,
    ``torch.cuda.max_memory_allocated`` over 2 steps minus the allocation before them.

``run(shape, dropouts, rounds, device, dtype)`` returns the results as a dict, for other tools.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import asdict

import torch

import minilora
from minilora_bench.models import Shape, llama_config, parse_shape


# The benchmark package's shape (4 layers here: DoRA's norm makes each step dearer) and its one
# LlamaConfig builder.
DEFAULT_SHAPE = Shape(layers=4)


CONTENDERS = ("minilora DoRA", "PEFT DoRA", "minilora LoRA")


def build(kind: str, dropout: float, shape: Shape, device: str, dtype: torch.dtype):
    """(model, AdamW) for one contender; the same seed gives every contender the same base."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(shape)).to(device=device, dtype=dtype)
    targets = list(minilora.LLAMA_TARGETS)
    if kind == "PEFT DoRA":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=shape.r, lora_alpha=shape.alpha, lora_dropout=dropout,
                                                           target_modules=targets, use_dora=True))
    else:
        minilora.inject(model, r=shape.r, alpha=shape.alpha, dropout=dropout, target_modules=targets,
                        use_dora=kind == "minilora DoRA")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def saved_for_backward_bytes(model, ids) -> int:
    """Bytes of the tensors autograd saved in forward that are still held when backward starts,
    parameters excluded, each storage once.

    Tensors saved for a graph dropped before backward (say for a product that is then detached)
    are freed with it and do not count: only weak references are kept here."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[weakref.ref] = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    held = {}
    for ref in saved:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in params:
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(held.values())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(kind: str, dropout: float, shape: Shape, device: str, dtype: torch.dtype) -> int:
    """Peak bytes over 2 steps beyond the built model and optimizer (module doc)."""
    model, optimizer = build(kind, dropout, shape, device, dtype)
    ids = _ids(shape, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(2):
            step(model, optimizer, ids)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = _status_bytes("VmRSS")
    for _ in range(2):
        step(model, optimizer, ids)
    return _status_bytes("VmHWM") - before


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _ids(shape: Shape, device: str) -> torch.Tensor:
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(1)).to(device)


def run(shape: Shape, dropouts=(0.0, 0.1), rounds: int = 5, device: str = "cpu",
        dtype: torch.dtype = torch.float32) -> dict:
    """Step times (median, min, max, all samples), saved-for-backward bytes and peak memory per contender."""
    names = [(kind, d) for d in dropouts for kind in CONTENDERS if not (kind == "minilora LoRA" and d != dropouts[0])]
    ids = _ids(shape, device)
    built = {name: build(*name, shape, device, dtype) for name in names}
    results = {name: {"saved_for_backward_bytes": saved_for_backward_bytes(built[name][0], ids), "samples": []}
               for name in names}
    for name in names:  # warm-up: AdamW allocates its state in the first step
        for _ in range(2):
            step(*built[name], ids)
    gc.disable()
    try:
        for i in range(rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                _sync(device)
                start = time.perf_counter()
                step(*built[name], ids)
                _sync(device)
                results[name]["samples"].append(time.perf_counter() - start)
    finally:
        gc.enable()
    del built
    for (kind, dropout), result in results.items():
        result["step_s"] = statistics.median(result["samples"])
        if device == "cuda":
            result["peak_memory_bytes"] = peak_memory(kind, dropout, shape, device, dtype)
        else:  # a fresh process each, so no contender reuses memory another freed
            out = subprocess.run([sys.executable, __file__, "--peak-of", kind, str(dropout), "--shape",
                                  ",".join(f"{k}={v}" for k, v in asdict(shape).items()),
                                  "--dtype", str(dtype).removeprefix("torch."), "--threads", str(torch.get_num_threads())],
                                 capture_output=True, text=True)
            if out.returncode != 0:  # keep the timings; the table says the peak was not measured
                print(f"dora_bench: the peak-memory process for {kind}, dropout {dropout} failed "
                      f"({out.returncode}):\n{out.stderr[-3000:]}", file=sys.stderr)
                result["peak_memory_bytes"] = None
            else:
                result["peak_memory_bytes"] = int(out.stdout.split()[-1])
    return {f"{kind}, dropout {dropout:g}": r for (kind, dropout), r in results.items()}


def markdown(results: dict) -> str:
    lines = ["| contender | step (s) | min–max (s) | vs PEFT DoRA (same dropout) | saved for backward (MiB) | "
             "peak memory (MiB) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        dropout = name.rsplit(" ", 1)[-1]
        peft_step = results.get(f"PEFT DoRA, dropout {dropout}", {}).get("step_s")
        ratio = f"{r['step_s'] / peft_step:.3f}" if peft_step else "–"
        lines.append(f"| {name} | {r['step_s']:.3f} | {min(r['samples']):.3f}–{max(r['samples']):.3f} | {ratio} | "
                     f"{r['saved_for_backward_bytes'] / 2**20:.0f} | "
                     + ("not measured (failed)" if r["peak_memory_bytes"] is None else
                        f"{r['peak_memory_bytes'] / 2**20:.0f}") + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--shape", default="", help="a named shape and/or overrides, e.g. layers=2,hidden=256,seq=128 (fields of minilora_bench.models.Shape)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="also write the results (every sample included) to this file")
    p.add_argument("--peak-of", nargs=2, metavar=("KIND", "DROPOUT"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shape = parse_shape(args.shape, DEFAULT_SHAPE)
    except ValueError as e:
        print(f"dora_bench: --shape {args.shape!r}: {e}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if args.peak_of:
        print(peak_memory(args.peak_of[0], float(args.peak_of[1]), shape, args.device, dtype))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("dora_bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    start = time.time()
    load = os.getloadavg()[0]
    results = run(shape, rounds=args.rounds, device=args.device, dtype=dtype)
    print(f"{' '.join(['python', *sys.argv])}\n")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"threads, device {args.device} ({args.dtype}); torch {torch.__version__}; load average {load:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end; {time.time() - start:.0f} s")
    print(f"Llama {shape.layers} layers, hidden {shape.hidden}, intermediate {shape.intermediate}, vocab {shape.vocab}; "
          f"batch {shape.batch} x {shape.seq} tokens; r={shape.r}, alpha={2 * shape.r} on the seven projections; "
          f"median of {args.rounds} alternated steps\n")
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": asdict(shape), "device": args.device, "dtype": args.dtype, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
