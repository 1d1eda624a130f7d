#!/usr/bin/env python
"""The forgetting guard's share, measured on the demo: what each share of self-distillation windows
costs in medical gain and buys in chat drift, and the demo with the guard over several seeds.

Every run is the embedded demo's own run (``minilora-train`` with no model and no data: SmolLM2-135M-
Instruct, the packaged MedQuAD subset, LoRA r 16 on the top 8 layers, 45 updates of 8 x 128 tokens,
bfloat16 where the CPU has it), through the same settings code (``demo.demo_lora_args``), with
``--replay_self SHARE --seed SEED``; the held-out questions the demo also answers are left out (they
change no figure). The base is measured once per process; the guard's answers are cached on disk.

    python scripts/lab/forgetting_guard.py --shares 0 0.1 0.25 0.4 --seeds 42       # the share curve
    python scripts/lab/forgetting_guard.py --shares 0.25 --seeds 42 43 44           # the chosen share, 3 seeds
    python scripts/lab/forgetting_guard.py --table                                  # docs/forgetting.md's table

Results: docs/measurements/forgetting-guard.json (rewritten after every run; finished runs are
skipped, so an interrupted call continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/lab/ -> the repository
DEFAULT_JSON = os.path.join(ROOT, "docs", "measurements", "forgetting-guard.json")
# The demo's targets (issue 28): medical perplexity at least 20% lower, general at most 5% higher,
# chat drift at most 0.05 nats per answer token.
MEDICAL_TARGET, GENERAL_LIMIT, DRIFT_LIMIT = -20.0, 5.0, 0.05


def change(run: dict, name: str) -> float:
    return 100.0 * (run["final"][name] - run["base"][name]) / run["base"][name]


def one_run(share: float, seed: int, workdir: str, cache: dict) -> dict:
    from minilora_train.base_model import convert_gguf, packaged_smollm2
    from minilora_train.config import parse_args
    from minilora_train.demo import demo_lora_args
    from minilora_train.loop import run

    out = os.path.join(workdir, f"share{share:g}_seed{seed}")
    args = demo_lora_args(parse_args(["--replay_self", str(share), "--seed", str(seed), "--output_dir", out,
                                      "--report_to", "none", "--device", "cpu"]), str(convert_gguf(packaged_smollm2())))
    started = time.time()
    summary = run(args, base_cache=cache)
    mc = summary["medical_mc"]
    return {"share": share, "seed": seed,
            "base": {"medical": summary["base"]["validation"]["perplexity"],
                     "general": summary["base"]["general"]["perplexity"]},
            "final": {"medical": summary["final"]["validation"]["perplexity"],
                      "general": summary["final"]["general"]["perplexity"]},
            "chat_drift": summary["chat_drift"]["drift"],
            "mc": {"base": mc["base"]["correct"], "adapted": mc["adapted"]["correct"], "n": mc["n"],
                   "p_value": mc["p_value"]} if "n" in mc else None,
            "guard": summary["forgetting_guard"], "updates": summary["updates"],
            "train_windows": summary["train_windows"], "bf16": args.bf16,
            "seconds_per_update": 1 / summary["steps_per_second"] if summary.get("steps_per_second") else None,
            "wall_seconds": round(time.time() - started, 1)}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(runs: list[dict]) -> list[dict]:
    """Per share: mean and standard deviation over its seeds, and whether the mean meets the targets."""
    rows = []
    for share in sorted({r["share"] for r in runs}):
        group = [r for r in runs if r["share"] == share]
        row = {"share": share, "seeds": sorted(r["seed"] for r in group)}
        for key, values in (("medical", [change(r, "medical") for r in group]),
                            ("general", [change(r, "general") for r in group]),
                            ("drift", [r["chat_drift"] for r in group]),
                            ("mc_adapted", [r["mc"]["adapted"] for r in group if r.get("mc")])):
            if values:
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
        row["meets_targets"] = (row["medical_mean"] <= MEDICAL_TARGET and row["general_mean"] <= GENERAL_LIMIT
                                and row["drift_mean"] <= DRIFT_LIMIT)
        rows.append(row)
    return rows


def _pm(mean: float, std: float | None, fmt: str) -> str:
    return format(mean, fmt) + (f" ± {std:{fmt.lstrip('+')}}" if std is not None else "")


def table(results: dict) -> str:
    """The markdown table docs/forgetting.md shows, from the JSON."""
    runs = results["runs"]
    base_mc = next((r["mc"]["base"] for r in runs if r.get("mc")), None)
    lines = ["| share | seeds | medical change | general change | chat drift | MC right of 40 | targets met |",
             "|---|---|---|---|---|---|---|"]
    for row in results["summary"]:
        mc = (_pm(row["mc_adapted_mean"], row.get("mc_adapted_std"), ".1f") if "mc_adapted_mean" in row else "n/a")
        lines.append(f"| {100 * row['share']:.0f}% | {', '.join(map(str, row['seeds']))} | "
                     f"{_pm(row['medical_mean'], row['medical_std'], '+.1f')}% | "
                     f"{_pm(row['general_mean'], row['general_std'], '+.1f')}% | "
                     f"{_pm(row['drift_mean'], row['drift_std'], '+.3f')} | {mc} (base {base_mc}) | "
                     f"{'yes' if row['meets_targets'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--json", default=DEFAULT_JSON)
    parser.add_argument("--workdir", default="/tmp/minilora-forgetting-guard")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the demo's machine has 2 cores)")
    parser.add_argument("--table", action="store_true", help="print the doc's table from the JSON and stop")
    args = parser.parse_args(argv)

    results = {"runs": []}
    if os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)
    if args.table:
        print(table(results))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    cache: dict = {}
    for share in args.shares:
        for seed in args.seeds:
            if any(r["share"] == share and r["seed"] == seed for r in results["runs"]):
                continue
            result = one_run(share, seed, args.workdir, cache)
            results["runs"].append(result)
            results["summary"] = summarize(results["runs"])
            results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                  "torch_threads": args.threads, "torch": torch.__version__,
                                  "note": "wall times measured on a machine shared with other jobs (loaded)"}
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1)
            os.replace(tmp, args.json)
            print(f"[guard] share {share:g} seed {seed}: medical {change(result, 'medical'):+.1f}%, general "
                  f"{change(result, 'general'):+.1f}%, drift {result['chat_drift']:+.3f} "
                  f"({result['wall_seconds']:.0f} s)", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
