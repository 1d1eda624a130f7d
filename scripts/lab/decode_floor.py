"""One decode step of a batch through five models of the same base, to tell what an adapter
library costs from what the model itself costs: a plain transformers model, minilora's model with
its adapters disabled and with one active adapter, PEFT's model with its adapters disabled and with
one active adapter. Every adapted model holds the same ``--adapters`` adapters (the benchmark's
multi section builds them: random values, r 16 on the seven projections).

    python scripts/lab/decode_floor.py                      # SmolLM2-135M's shape, 64 adapters
    python scripts/lab/decode_floor.py --adapters 1 --layers 8

The contenders alternate, the order rotating by one each round, with Python's garbage collector
held off; the table gives each one's median and fastest call (the first round is warm-up).
This is how the per-forward module walk (docs/benchmarks.md, "Many adapters in one batch") was
found: minilora's base alone cost more than a plain model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time

import torch

import minilora
from minilora_bench.models import SHAPES, build_model
from minilora_bench.multi import Contender, build_minilora, build_peft
from minilora_train.command import quiet_start


def run(layers: int, adapters: int, rows: int, tokens: int, rounds: int, seed: int = 0) -> dict:
    """Median and fastest seconds of one decode step (``rows`` x 1 token over a KV cache of
    ``tokens``) for each contender."""
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
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    with torch.inference_mode():
        for c in contenders.values():
            c.start_decoding(prompt)
        gc.collect()
        gc.disable()
        try:
            for i in range(rounds + 1):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    c = contenders[name]
                    with c.around():
                        start = time.perf_counter()
                        c.decode(step)
                        seconds[name].append(time.perf_counter() - start)
        finally:
            gc.enable()
    return {name: {"median": statistics.median(s[1:]), "min": min(s[1:])} for name, s in seconds.items()}


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
    for name, r in results.items():
        print(f"| {name} | {r['median'] * 1e3:.1f} | {r['min'] * 1e3:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
