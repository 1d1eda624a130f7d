"""Where a run's numbers go: metrics.jsonl, the progress bar or log lines, wandb, loss.png."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from .config import TrainArgs
from .outputs import RunDir


class Reporter:
    def __init__(self, args: TrainArgs, run_dir: RunDir, device, total_updates: int, start_update: int = 0,
                 history: Optional[list] = None):
        self.args, self.run_dir, self.device, self.total = args, run_dir, device, total_updates
        self.metrics_path = run_dir.path("metrics.jsonl")
        self.main = device.is_main  # the others report nothing: one log, one set of files
        self.records: list[dict] = self._read_existing(start_update) if start_update else []
        if self.main and not start_update and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)
        self.start_update = start_update
        self.started = time.time()
        self.last_time, self.last_update = self.started, start_update
        self.tokens_per_update = (device.global_batch(args.per_device_train_batch_size)
                                  * args.gradient_accumulation_steps * args.max_seq_length)
        self.bar = None
        self.wandb = None

    def _read_existing(self, start_update: int) -> list[dict]:
        """A resumed run's earlier records: those up to the checkpoint it resumes from.

        A kill can leave the last line half-written, and records logged after the checkpoint
        will be logged again by the resumed run; both are dropped and the file rewritten so that
        it holds one record per update again.
        """
        if not os.path.exists(self.metrics_path):
            return []
        records = []
        with open(self.metrics_path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # the torn last line of a killed run
                if isinstance(record, dict) and record.get("update", 0) <= start_update:
                    records.append(record)
        if self.main:
            tmp = self.metrics_path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            os.replace(tmp, self.metrics_path)
        return records

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, trainable: int, total: int, train_windows: Optional[int]) -> None:
        if not self.main:
            return
        self.run_dir.write_json("train_config.json", self.args.redacted())
        layout = self.device.layout.describe()
        print(f"device: {self.device.describe()}" + (f" | {layout}" if layout else "")
              + f" | trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f} | updates: {self.total}"
              + (f" | training windows: {train_windows:,d}" if train_windows else ""), flush=True)
        if self.args.report_to == "wandb":
            self.wandb = _start_wandb(self.args, self.run_dir)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.start_update, unit="update", dynamic_ncols=True)

    def train(self, update: int, loss: float, lr: float, epoch: float) -> None:
        now = time.time()
        done = update - self.last_update
        rate = done / max(1e-9, now - self.last_time)
        self.last_time, self.last_update = now, update
        if not self.main:
            return
        eta = (self.total - update) / rate if rate > 0 else float("nan")
        record = {"update": update, "epoch": round(epoch, 4), "train_loss": loss, "lr": lr,
                  "tokens_per_second": rate * self.tokens_per_update, "time": now - self.started}
        self._emit(record)
        if self.bar is not None:  # refreshed at logging steps only: on XLA anything else would be a host sync
            self.bar.update(done)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
        else:
            print(f"update {update}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
                  f"{record['tokens_per_second']:.0f} tok/s | eta {_duration(eta)}", flush=True)

    def eval(self, update: int, results: dict, tag: str) -> None:
        if not self.main:
            return
        record = {"update": update, "eval_tag": tag}
        for name, r in results.items():
            record[f"{name}_loss"] = r["loss"]
            record[f"{name}_perplexity"] = r["perplexity"]
        self._emit(record)
        text = " | ".join(f"{name} loss {r['loss']:.4f} ppl {r['perplexity']:.2f}" for name, r in results.items())
        line = f"eval ({tag}, update {update}): {text}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        if tag != "base":  # before training there is nothing to draw yet
            self.plot()

    def steps_per_second(self) -> Optional[float]:
        done = self.last_update - self.start_update
        return done / max(1e-9, self.last_time - self.started) if done else None

    def finish(self, summary: dict) -> None:
        self.close(summary)  # the final evaluation has drawn loss.png already

    def close(self, summary: Optional[dict] = None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb is not None:
            if summary:
                for key in ("updates", "trainable_params", "wall_seconds"):
                    self.wandb.summary[key] = summary[key]
            self.wandb.finish()
            self.wandb = None
            if self.run_dir.remote and os.path.isdir(self.run_dir.path("wandb")):
                self.run_dir.publish("wandb")

    # -- outputs -----------------------------------------------------------------------------

    def _emit(self, record: dict) -> None:
        self.records.append(record)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.run_dir.publish("metrics.jsonl")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "update"},
                           step=record["update"])

    def plot(self) -> None:
        """loss.png: training loss and every evaluated loss against optimizer updates."""
        if not self.main:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["update"], r["train_loss"]) for r in self.records if "train_loss" in r]
        evals = [r for r in self.records if "eval_tag" in r]
        names = sorted({k[:-5] for r in evals for k in r if k.endswith("_loss")})
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="training loss", color="tab:blue")
        for name, color in zip(names, ("tab:orange", "tab:green", "tab:red", "tab:purple")):
            points = [(r["update"], r[f"{name}_loss"]) for r in evals if f"{name}_loss" in r]
            ax.plot(*zip(*points), "o-", label=f"{name} loss", color=color)
        ax.set_xlabel("optimizer update")
        ax.set_ylabel("loss (mean token NLL)")
        ax.set_title(f"{'LoRA' if self.args.use_lora else 'full fine-tuning'}: {os.path.basename(self.args.output_dir.rstrip('/'))}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.run_dir.path("loss.png"), dpi=100)
        plt.close(fig)
        self.run_dir.publish("loss.png")


def _start_wandb(args: TrainArgs, run_dir: RunDir):
    """The real wandb, offline unless a key is given (WANDB_MODE still wins). The key reaches
    wandb through this process's environment only; the command line wandb records is scrubbed."""
    import wandb

    key = args.wandb_key or os.environ.get("WANDB_API_KEY")
    if args.wandb_key:
        os.environ["WANDB_API_KEY"] = args.wandb_key
    os.environ.setdefault("WANDB_SILENT", "true")
    if not os.environ.get("WANDB_MODE"):
        os.environ.pop("WANDB_MODE", None)  # an empty value is an error inside wandb
    mode = os.environ.get("WANDB_MODE") or ("online" if key else "offline")
    scrub_argv(args)
    return wandb.init(project=args.wandb_project, dir=run_dir.local, mode=mode, config=args.redacted(),
                      settings=wandb.Settings(save_code=False, disable_git=True))


def scrub_argv(args: TrainArgs) -> None:
    """Replace secret values in sys.argv (which wandb and crash reports record)."""
    secrets = [s for s in (args.wandb_key, args.huggingface_token) if s]
    sys.argv = ["<redacted>" if any(s in a for s in secrets) else a for a in sys.argv]


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# -- the forgetting report -------------------------------------------------------------------------

def _method_row(summary: dict) -> dict:
    base, final = summary["base"], summary["final"]
    row = {"method": "LoRA" if summary["use_lora"] else "full fine-tuning",
           "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
           "checkpoint_bytes": summary["adapter_bytes"] if summary["use_lora"] else summary["model_bytes"],
           "seconds_per_update": 1 / summary["steps_per_second"] if summary.get("steps_per_second") else None,
           "peak_memory_bytes": summary.get("peak_memory_bytes"),
           "optimizer_state_bytes": summary.get("optimizer_state_bytes"), "updates": summary["updates"],
           "learning_rate": summary.get("learning_rate")}
    chat = summary.get("chat_drift") or {}
    if "drift" in chat:
        row["chat_drift"] = chat["drift"]
    elif chat.get("not_measured"):
        row["chat_drift_note"] = chat["not_measured"]
    for name, label in (("validation", "medical"), ("general", "general")):
        if name in final:
            b, f = base[name]["perplexity"], final[name]["perplexity"]
            row[f"{label}_perplexity_base"] = b
            row[f"{label}_perplexity"] = f
            row[f"{label}_change_percent"] = 100 * (f - b) / b
    return row


def write_report(run_dir: RunDir, summary: dict, full: Optional[dict] = None) -> dict:
    """report.json, report.md and report.png: base vs adapted perplexity on the run's own
    (medical) validation text and on general English, for LoRA and, if run, full fine-tuning."""
    rows = [_method_row(summary)] + ([_method_row(full)] if full else [])
    report = {"methods": rows, "note": _verdict(rows)}
    run_dir.write_json("report.json", report)

    def fmt(value, kind):
        if value is None:
            return "n/a"
        if kind == "ppl":
            return f"{value:,.2f}"
        if kind == "pct":
            return f"{value:+.1f}%"
        if kind == "bytes":
            return f"{value / 1e6:,.2f} MB"
        if kind == "lr":
            return f"{value:.2g}"
        if kind == "nats":
            return f"{value:+.3f}"
        if kind == "s":
            return f"{value:.3f} s"
        return f"{value:,d}"

    lines = ["# Forgetting report", "",
             "Perplexity of the base model and of the adapted model on the run's validation text (medical) "
             "and on general English held out from all training. Lower is better; a rise on general text is "
             "forgetting. Chat drift (instruct bases): how much less likely the adapted model finds the base's "
             "own answers to everyday requests, in nats per answer token; 0 is unchanged, larger is further away.", "",
             "| | " + " | ".join(r["method"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    table = [("medical perplexity, base", "medical_perplexity_base", "ppl"),
             ("medical perplexity, adapted", "medical_perplexity", "ppl"),
             ("medical change", "medical_change_percent", "pct"),
             ("general perplexity, base", "general_perplexity_base", "ppl"),
             ("general perplexity, adapted", "general_perplexity", "ppl"),
             ("general change (forgetting)", "general_change_percent", "pct"),
             ("chat drift on everyday prompts (nats/token)", "chat_drift", "nats"),
             ("trainable parameters", "trainable_params", "int"),
             ("checkpoint size", "checkpoint_bytes", "bytes"),
             ("optimizer state", "optimizer_state_bytes", "bytes"),
             ("time per update", "seconds_per_update", "s"),
             ("peak accelerator memory", "peak_memory_bytes", "bytes"),
             ("optimizer updates", "updates", "int"),
             ("peak learning rate", "learning_rate", "lr")]
    for label, key, kind in table:
        if any(key in r for r in rows):
            lines.append(f"| {label} | " + " | ".join(fmt(r.get(key), kind) for r in rows) + " |")
    lines += ["", report["note"], ""]
    with open(run_dir.path("report.md"), "w") as f:
        f.write("\n".join(lines))
    run_dir.publish("report.md")
    _report_plot(run_dir, rows)
    return report


def _verdict(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if "general_change_percent" in r:
            change = r["general_change_percent"]
            word = "rose" if change > 0 else "fell"
            parts.append(f"With {r['method']}, general-English perplexity {word} by {abs(change):.1f}% "
                         f"while medical perplexity changed by {r.get('medical_change_percent', float('nan')):+.1f}%.")
    if rows[0].get("chat_drift_note"):
        parts.append(f"Chat drift: {rows[0]['chat_drift_note']}.")
    if len(rows) == 2:
        parts.append(_comparison(*rows))
    return " ".join(parts) or "No general-English evaluation was run (--general_eval_dataset none)."


# Medical perplexity changes (percentage points) within which two runs count as adapted comparably
COMPARABLE_POINTS = 5.0


def _comparison(lora: dict, full: dict) -> str:
    """Which forgot less, said only when both reached about the same medical gain: at different
    gains the one that learned more is expected to have moved more, which settles nothing."""
    medical = (lora.get("medical_change_percent"), full.get("medical_change_percent"))
    if None in medical:
        return "No medical change was measured, so the two cannot be compared."
    if abs(medical[0] - medical[1]) > COMPARABLE_POINTS:
        more = "LoRA" if medical[0] < medical[1] else "full fine-tuning"
        return (f"The two did not adapt comparably (medical perplexity {medical[0]:+.1f}% with LoRA, "
                f"{medical[1]:+.1f}% with full fine-tuning; {more} learned more), so this run does not say which "
                "forgets less: compare at matched medical gain, e.g. rerun with another --learning_rate or "
                "--full_finetune_learning_rate until the two medical changes are within "
                f"{COMPARABLE_POINTS:g} points.")
    verdicts = [f"The two adapted comparably (medical perplexity {medical[0]:+.1f}% vs {medical[1]:+.1f}%)."]
    if "chat_drift" in lora and "chat_drift" in full:
        less = lora["chat_drift"] < full["chat_drift"]
        verdicts.append(f"As an assistant (chat drift), LoRA moved {'less' if less else 'NOT less'} than full "
                        f"fine-tuning ({lora['chat_drift']:+.3f} vs {full['chat_drift']:+.3f} nats per answer token).")
    if "general_change_percent" in lora and "general_change_percent" in full:
        less = lora["general_change_percent"] < full["general_change_percent"]
        verdicts.append(f"On general English, LoRA {'forgot less' if less else 'did NOT forget less'} than full "
                        f"fine-tuning (perplexity {lora['general_change_percent']:+.1f}% vs "
                        f"{full['general_change_percent']:+.1f}%).")
    return " ".join(verdicts)


def _report_plot(run_dir: RunDir, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("medical", "general") if f"{g}_perplexity" in rows[0]]
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        labels = ["base"] + [r["method"] for r in rows]
        values = [rows[0][f"{group}_perplexity_base"]] + [r[f"{group}_perplexity"] for r in rows]
        ax.bar(labels, values, color=["tab:gray", "tab:blue", "tab:red"][:len(values)])
        ax.set_title(f"{group} perplexity (lower is better)")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir.path("report.png"), dpi=100)
    plt.close(fig)
    run_dir.publish("report.png")
