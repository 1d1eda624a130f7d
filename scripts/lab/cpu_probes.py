"""The small CPU measurements behind the choices in minilora/layer.py's dropout mask and
train/loss.py's chunked loss (docs/benchmarks.md, "SmolLM2's shape on two CPU cores"). Each probe
alternates its contenders in one process and prints medians; run it on a quiet machine.

    python scripts/lab/cpu_probes.py mask          # converting and drawing a (1024, 576) mask, 1 thread
    python scripts/lab/cpu_probes.py loss          # chunked_nll by chunk size vs the unfused head + loss
    python scripts/lab/cpu_probes.py step          # a whole SmolLM2-shaped LoRA step, chunked vs full logits
    python scripts/lab/cpu_probes.py xla-loss --tokens 4096 --rows 256,1024   # XLA: the loss's planned memory
    python scripts/lab/cpu_probes.py xla-app       # the app's update on XLA's CPU device, chunked vs full logits

``loss`` also gives each contender's peak RSS, from a fresh process per contender (``--memory``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import minilora
from minilora_train.loss import chunked_nll, summed_nll

VOCAB, HIDDEN = 49152, 576  # SmolLM2-135M's head


def medians(contenders: dict, rounds: int) -> dict:
    """{name: median seconds} of ``rounds`` alternated calls of each contender, after one untimed
    (the benchmark's alternation, minilora_bench.timing.alternate)."""
    from minilora_bench.timing import alternate

    return {name: statistics.median(t) for name, t in alternate(contenders, rounds, warmup=1).items()}


def words_mask(x: torch.Tensor) -> torch.Tensor:
    from minilora_bench.models import mask_path

    with mask_path("words"):  # the AMD path on any CPU
        return minilora.dropout.dropout_mask(x, 0.05)


def probe_mask() -> dict:
    """Milliseconds per (1024, 576) mask, one thread: converting the bool mask as minilora did and
    does (through its int8 bytes), and drawing it from random words."""
    torch.set_num_threads(1)
    keep = torch.rand(1024, 576) > 0.05
    ms = medians({
        "bool -> float32": lambda: keep.to(torch.float32),
        "bool as int8 -> float32": lambda: keep.view(torch.int8).to(torch.float32),
        "bool -> bfloat16": lambda: keep.to(torch.bfloat16),
        "bool as int8 -> bfloat16": lambda: keep.view(torch.int8).to(torch.bfloat16),
        "the random-word mask, p = 0.05 (draw and comparison)": lambda: words_mask(keep),
    }, rounds=80)
    return {name: seconds * 1e3 for name, seconds in ms.items()}  # milliseconds


def loss_contenders(tokens: int, rows: list[int]) -> dict:
    weight = torch.randn(VOCAB, HIDDEN) * 0.02
    hidden = torch.randn(tokens, HIDDEN)
    labels = torch.randint(0, VOCAB, (tokens,))

    def unfused():
        h = hidden.clone().requires_grad_()
        F.cross_entropy(F.linear(h, weight).float(), labels, reduction="sum").backward()

    def chunked(n):
        h = hidden.clone().requires_grad_()
        chunked_nll(h, weight, labels, n).backward()

    return {"unfused": unfused, **{f"chunks of {n}": (lambda n=n: chunked(n)) for n in rows}}


def probe_loss(tokens: list[int], rows: list[int], memory: bool) -> dict:
    torch.set_num_threads(2)
    out = {}
    for n in tokens:
        seconds = medians(loss_contenders(n, rows), rounds=3)
        out[n] = {name: {"seconds": s} for name, s in seconds.items()}
        if memory:  # peak RSS needs a process of its own per contender
            for name in seconds:
                proc = subprocess.run([sys.executable, __file__, "loss-memory", str(n), name, *map(str, rows)],
                                      capture_output=True, text=True, check=True)
                out[n][name]["peak_rss_mib"] = json.loads(proc.stdout)["peak_rss_mib"]
    return out


def loss_memory(tokens: int, name: str, rows: list[int]) -> dict:
    """One contender's peak RSS: VmHWM, which starts anew at exec (getrusage's maximum would carry
    the parent's over)."""
    from minilora_bench.timing import proc_status_bytes

    torch.set_num_threads(2)
    loss_contenders(tokens, rows)[name]()
    return {"peak_rss_mib": proc_status_bytes("VmHWM") / 2**20}


def probe_step(rounds: int) -> dict:
    """A LoRA training step (r=16 on the seven projections, dropout 0.05, fused AdamW) at SmolLM2's
    shape, random weights, 8 x 128 tokens, the loss chunked or over full logits, alternated: wall
    and process CPU seconds (all threads) per step."""
    from minilora_bench.models import SHAPES, llama_config
    from transformers import LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(SHAPES["smollm2-135m"]))
    minilora.inject(model, r=16, alpha=32, dropout=0.05)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(0, VOCAB, (8, 128))
    cpu = {True: [], False: []}

    def step(chunked):
        started = time.process_time()
        (summed_nll(model, ids, ids, chunked=chunked) / ids.numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cpu[chunked].append(time.process_time() - started)

    wall = medians({"chunked": lambda: step(True), "full logits": lambda: step(False)}, rounds)
    return {"chunked": {"seconds": wall["chunked"], "cpu_seconds": statistics.median(cpu[True][1:])},
            "full logits": {"seconds": wall["full logits"], "cpu_seconds": statistics.median(cpu[False][1:])}}


def probe_xla_loss(tokens: int, rows: list[int]) -> dict:
    """The memory XLA's CPU compiler plans (its buffer assignment's "Total bytes used", the largest
    over the process's graphs) for the loss alone, forward and backward, at SmolLM2's head, and its
    time there: unfused, and chunked in chunks of each of ``rows``, each in a fresh process with
    PJRT_DEVICE=CPU and its HLO dumped to a temporary folder."""
    out = {}
    for name, n in [("unfused", 0)] + [(f"chunks of {n}", n) for n in rows]:
        with tempfile.TemporaryDirectory() as dump:
            env = {**os.environ, "PJRT_DEVICE": "CPU", "XLA_FLAGS": f"--xla_dump_to={dump}"}
            proc = subprocess.run([sys.executable, __file__, "xla-loss-child", str(tokens), str(n)],
                                  env=env, check=True, capture_output=True, text=True)
            planned = []
            for path in glob.glob(os.path.join(dump, "*buffer-assignment.txt")):
                with open(path) as f:
                    match = re.search(r"Total bytes used: (\d+)", f.read())
                planned.append(int(match.group(1)) if match else 0)
        out[name] = {"planned_mib": max(planned) / 2**20, **json.loads(proc.stdout.strip().splitlines()[-1])}
    return {str(tokens): out}


def xla_loss_child(tokens: int, rows: int) -> dict:
    """Forward and backward of the loss on XLA's CPU device: the median seconds of 3 calls after a
    first that compiles (XLA's CPU device is a development target; a TPU's times differ)."""
    import torch_xla

    device = torch_xla.device()
    weight = (torch.randn(VOCAB, HIDDEN) * 0.02).to(device)

    def call():
        hidden = torch.randn(tokens, HIDDEN).to(device).requires_grad_()
        labels = torch.randint(0, VOCAB, (tokens,)).to(device)
        torch_xla.sync()
        if rows:
            loss = chunked_nll(hidden, weight, labels, rows)
        else:
            loss = F.cross_entropy(F.linear(hidden, weight), labels, reduction="sum")
        loss.backward()
        torch_xla.sync()
        hidden.grad.cpu()

    return {"seconds": medians({"loss": call}, rounds=3)["loss"]}


def probe_xla_app(updates: int) -> dict:
    """The training app (minilora_train.loop.run) on XLA's CPU device at SmolLM2's shape, 8 x 128 tokens,
    random weights, LoRA r=16 dropout 0.05 on the seven projections: --chunked_loss (asked for by
    name, as XLA needs) against --no-chunked_loss, each in a fresh process, one after the other:
    steady seconds per update, the process's peak RSS, and compiles after warm-up."""
    from minilora_bench.cli import MEDQUAD
    from minilora_bench.loop import APP_CHILD
    from minilora_bench.models import SHAPES, Settings
    from minilora_bench.packing import prepare_text
    from minilora_bench.timing import child_env
    from minilora_bench.xla import save_loop_model, steady_update_seconds

    shape = SHAPES["smollm2-135m"]
    out = {}
    with tempfile.TemporaryDirectory() as work:
        tokenizer_dir, _, data_file, _ = prepare_text(Settings(), MEDQUAD, work)
        model_dir = save_loop_model(shape, tokenizer_dir, os.path.join(work, "model"), 0)
        argv = ["--model_name", model_dir, "--dataset_dir", data_file, "--use_lora", "--lora_r", "16",
                "--lora_dropout", "0.05", "--max_seq_length", str(shape.seq), "--per_device_train_batch_size",
                str(shape.batch), "--per_device_eval_batch_size", str(shape.batch), "--max_steps", str(updates),
                "--logging_steps", "1", "--device", "xla", "--report_to", "none", "--save_epoch_percentage", "0",
                "--general_eval_dataset", "none", "--max_eval_samples", str(shape.batch), "--overwrite_output_dir",
                "--seed", "0"]
        for name, flag in (("chunked", "--chunked_loss"), ("full logits", "--no-chunked_loss")):
            run_dir = os.path.join(work, name.replace(" ", "-"))
            env = {**child_env(), "PJRT_DEVICE": "CPU", "OMP_NUM_THREADS": "2"}
            proc = subprocess.run([sys.executable, "-c", APP_CHILD, json.dumps(argv + ["--output_dir", run_dir, flag])],
                                  capture_output=True, text=True, env=env, check=True)
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            with open(os.path.join(run_dir, "train_summary.json")) as f:
                summary = json.load(f)
            out[name] = {"update_seconds": steady_update_seconds(os.path.join(run_dir, "metrics.jsonl")),
                         "peak_rss_mib": child["peak_rss_bytes"] / 2**20,
                         "compiles_after_warmup": summary["xla"]["compiles_after_warmup"]}
    return out


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "loss-memory":  # the child of probe_loss
        print(json.dumps(loss_memory(int(sys.argv[2]), sys.argv[3], [int(r) for r in sys.argv[4:]])))
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "xla-loss-child":  # the child of probe_xla_loss
        print(json.dumps(xla_loss_child(int(sys.argv[2]), int(sys.argv[3]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=("mask", "loss", "step", "xla-loss", "xla-app"))
    p.add_argument("--tokens", default="1024,4096", help="loss: token counts, comma-separated (xla-loss: the last)")
    p.add_argument("--rows", default="16,128,256,512,1024", help="loss and xla-loss: chunk sizes, comma-separated")
    p.add_argument("--memory", action="store_true", help="loss: also each contender's peak RSS (fresh processes)")
    p.add_argument("--rounds", type=int, default=4, help="step: alternated steps per contender")
    p.add_argument("--updates", type=int, default=6, help="xla-app: updates per run (the first 2 warm up)")
    args = p.parse_args(argv)
    if args.probe == "mask":
        result = probe_mask()
    elif args.probe == "loss":
        result = probe_loss([int(t) for t in args.tokens.split(",")], [int(r) for r in args.rows.split(",")],
                            args.memory)
    elif args.probe == "xla-app":
        result = probe_xla_app(args.updates)
    elif args.probe == "xla-loss":
        result = probe_xla_loss(int(args.tokens.split(",")[-1]), [int(r) for r in args.rows.split(",")])
    else:
        result = probe_step(args.rounds)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
