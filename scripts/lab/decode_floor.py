"""One decode step of a batch through five models of the same base, to tell what an adapter
library costs from what the model itself costs: a plain transformers model, minilora's model with
its adapters disabled and with one active adapter, PEFT's model with its adapters disabled and with
one active adapter. Every adapted model holds the same ``--adapters`` adapters (the benchmark's
multi section builds them: random values, r 16 on the seven projections).

    python scripts/lab/decode_floor.py                      # SmolLM2-135M's shape, 64 adapters
    python scripts/lab/decode_floor.py --adapters 1 --layers 8

The contenders alternate as in the benchmark's multi section (one warm-up call each, then rounds
with the order rotating by one, Python's garbage collector held off); the table gives each one's
median and fastest call, and the number of modules in each model.
This is how the per-forward module walk (docs/benchmarks.md, "Many adapters in one batch") was
found: minilora's base alone cost more than a plain model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

import minilora
from minilora_bench.models import SHAPES, build_model
from minilora_bench.multi import Contender, build_minilora, build_peft, timed
from minilora_train.command import quiet_start


def run(layers: int, adapters: int, rows: int, tokens: int, rounds: int, seed: int = 0) -> dict:
    """Median and fastest seconds of one decode step (``rows`` x 1 token over a KV cache of
    ``tokens``) for each contender (the benchmark's multi-section timing: one warm-up call each,
    then alternated rounds), and the number of modules in each model."""
    shape = dataclasses.replace(SHAPES["smollm2-135m"], layers=layers)
    cpu = torch.device("cpu")
    ours = build_minilora(shape, adapters, seed, cpu, torch.float32)
    theirs = build_peft(ours, shape, adapters, seed, cpu, torch.float32)
    plain = build_model("base", 0.0, shape, seed, cpu, torch.float32).eval()
    minilora.set_adapter(ours, "adapter0")
    theirs.set_adapter("adapter0")
    contenders = {
        "transformers, no adapters": Contender(plain),
        "minilora, adapters disabled": Contender(ours, lambda: minilora.disable_adapters(ours)),
        "minilora, one adapter": Contender(ours),
        "PEFT, adapters disabled": Contender(theirs.get_base_model(), theirs.disable_adapter),
        "PEFT, one adapter": Contender(theirs.get_base_model()),
    }
    g = torch.Generator().manual_seed(seed + 2)
    prompt = torch.randint(0, shape.vocab, (rows, tokens), generator=g)  # (B, P)
    step = torch.randint(0, shape.vocab, (rows, 1), generator=g)  # (B, 1)
    with torch.inference_mode():
        for c in contenders.values():
            c.start_decoding(prompt)
        times = timed(contenders, lambda c: c.decode(step), rounds, lambda: None)
    # what a walk of the model's modules visits: one module per adapter and layer in the adapted ones
    modules = {"transformers": sum(1 for _ in plain.modules()), "minilora": sum(1 for _ in ours.modules()),
               "PEFT": sum(1 for _ in theirs.modules())}
    return {"decode_seconds": {name: {"median": t["median"], "min": t["min"]} for name, t in times.items()},
            "modules": modules}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M has 30)")
    parser.add_argument("--adapters", type=int, default=64, help="adapters loaded in each adapted model")
    parser.add_argument("--rows", type=int, default=32, help="batch rows, one new token each")
    parser.add_argument("--tokens", type=int, default=32, help="tokens already in the KV cache")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if min(args.layers, args.adapters, args.rows, args.tokens, args.rounds, args.threads) < 1:
        parser.error("every count must be at least 1")
    quiet_start("cpu")  # transformers need not import torch_xla for a CPU run
    torch.set_num_threads(args.threads)
    results = run(args.layers, args.adapters, args.rows, args.tokens, args.rounds)
    print("| contender | median (ms) | fastest (ms) |\n|---|---|---|")
    for name, r in results["decode_seconds"].items():
        print(f"| {name} | {r['median'] * 1e3:.1f} | {r['min'] * 1e3:.1f} |")
    print("modules: " + ", ".join(f"{name} {count:,}" for name, count in results["modules"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
