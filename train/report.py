"""Where a run's numbers go: metrics.jsonl, the progress bar or log lines, wandb, loss.png. The
forgetting report (report.md) is minilora_train.forgetting.report's."""

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

    def eval(self, update: int, results: dict, tag: str, extra: Optional[dict] = None) -> None:
        """One evaluation: each set's loss and perplexity, and ``extra`` measurements (the
        forgetting check's chat drift) under their own names."""
        if not self.main:
            return
        record = {"update": update, "eval_tag": tag}
        for name, r in results.items():
            record[f"{name}_loss"] = r["loss"]
            record[f"{name}_perplexity"] = r["perplexity"]
        record.update(extra or {})
        self._emit(record)
        text = " | ".join([f"{name} loss {r['loss']:.4f} ppl {r['perplexity']:.2f}" for name, r in results.items()]
                          + [f"{name.replace('_', ' ')} {value:+.3f}" for name, value in (extra or {}).items()])
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
