"""Time (and optionally profile) single training steps of full fine-tuning and minilora LoRA.

    python scripts/step_time.py --device cuda --profile \
        --shape layers=16,hidden=2048,intermediate=8192,heads=32,kv_heads=8,vocab=128256,batch=8,seq=2048
    PJRT_DEVICE=CPU python scripts/step_time.py --device xla \
        --shape layers=4,hidden=256,intermediate=688,heads=4,kv_heads=2,vocab=4096,batch=16,seq=128

The first gives docs/measurements/profile-h200-1b-8x2048.txt (the top kernels of two steps of
each method); the second the single-step XLA CPU timings of the demo-sized model quoted in
docs/benchmarks.md (XLA_FLAGS in the environment applies). The step is the benchmark's (forward,
backward, AdamW); the benchmark proper (minilora-bench) alternates contenders and reports ratios,
this script only looks at one method at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minilora_bench.models import Shape, Trainer, parse_shape  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda", "xla"), default="cpu")
    p.add_argument("--shape", default="", help="a named shape (llama-1b, smollm2-135m) and/or Shape overrides, e.g. layers=4,hidden=256")
    p.add_argument("--kinds", default="full,minilora", help="full, minilora, peft (comma-separated)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--profile", action="store_true", help="also print the top operators of 2 steps")
    args = p.parse_args()
    shape = parse_shape(args.shape, Shape())
    if args.device == "xla":
        import torch_xla

        device, sync = torch_xla.device(), torch_xla.sync
    else:
        device = torch.device(args.device)
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    for kind in args.kinds.split(","):
        trainer = Trainer(kind, args.dropout, shape, 0, device, dtype)

        def step():
            trainer.step()
            sync()  # XLA: cut and run the step's graph; CUDA: wait for its kernels

        for _ in range(3):  # AdamW state, and on XLA the compiles
            step()
        if args.device == "xla":
            import torch_xla.core.xla_model as xm

            xm.wait_device_ops()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        if args.device == "xla":
            xm.wait_device_ops()
        print(f"{kind}: {(time.perf_counter() - started) / args.steps:.4f} s/step "
              f"({args.device}, {shape.batch} x {shape.seq} tokens)", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(2):
                    step()
            sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=22, max_name_column_width=60))
        del trainer
    return 0


if __name__ == "__main__":
    sys.exit(main())
