#!/usr/bin/env python
"""The demo's MedQuAD fine-tuning through TRL's SFTTrainer with ``minilora.inject``, beside
``minilora-train``'s, on the same data and budget (docs/trainers.md, "An SFTTrainer run").

Both runs take the demo's settings (train/demo.py): SmolLM2-135M-Instruct from the packaged GGUF,
the packaged MedQuAD subset's 2,000 training pairs through the chat template with the loss on the
answers only, LoRA r 16 (alpha 32, no dropout) on the seven projections of the top 8 layers, 45
updates of 8 windows of 128 tokens, AdamW at 1e-3 with 4 warm-up updates and linear decay, weight
decay 0.01, gradient clipping at 1.0, bfloat16 base weights where the CPU computes bfloat16
natively (float32 elsewhere) and float32 adapters. SFTTrainer gets them as SFTConfig fields;
its packing ("wrapped") cuts the conversations into 128-token windows as minilora-train does.

Afterwards each saved adapter is loaded into a fresh base and measured by the same code:
perplexity on the demo's 32 held-out MedQuAD windows and on 32 windows of held-out fortunes
(general English), and chat drift on the demo's 20 everyday prompts (train/forgetting/drift.py). Seconds per
update: training wall time from the first update to the last, over the updates; a figure taken
while other work runs is marked "loaded" in the JSON (from the load average).

    python scripts/lab/sft_medquad.py                                   # both runs, then the table
    python scripts/lab/sft_medquad.py --runs sft --out /tmp/sft         # SFTTrainer alone
    python scripts/lab/sft_medquad.py --json docs/measurements/sft-medquad-cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

import torch



def demo_args(output_dir: str, base_dir: str):
    """The demo's TrainArgs (train/demo.py's DEMO_LORA and precision choice) for ``base_dir``."""
    from minilora_train.config import TrainArgs
    from minilora_train.demo import demo_lora_args

    args = demo_lora_args(TrainArgs(output_dir=output_dir), base_dir)
    args.replay_self = 0.0  # SFTTrainer has no forgetting guard: both loops train on the same MedQuAD windows alone
    return args


def chat_records(split: str) -> list[dict]:
    """The packaged MedQuAD pairs as TRL's conversational prompt-completion records."""
    from minilora_train.chat import user_message
    from minilora_train.demo_assets import read_medquad

    return [{"prompt": [{"role": "user", "content": user_message(r["question"])}],
             "completion": [{"role": "assistant", "content": r["answer"].strip()}]} for r in read_medquad(split)]


def load_base(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return AutoModelForCausalLM.from_pretrained(args.model_name, dtype=dtype), AutoTokenizer.from_pretrained(args.model_name)


def run_sft(args, records: list[dict]) -> dict:
    """SFTTrainer over a minilora-injected base; the adapter lands in ``args.output_dir``."""
    import minilora
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from minilora_train.base_model import top_layers

    model, tokenizer = load_base(args)
    minilora.inject(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    target_modules=args.lora_target_modules, layers_to_transform=top_layers(model, args.lora_top_layers))
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.per_device_train_batch_size,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, lr_scheduler_type="linear",
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
        max_length=args.max_seq_length, packing=True, packing_strategy="wrapped",
        bf16=False,  # the weights are already bfloat16 where that pays (args.bf16), as minilora-train's; no autocast
        gradient_checkpointing=False,  # minilora-train's demo does not checkpoint; TRL's default would
        logging_steps=args.logging_steps, save_strategy="no", report_to=[], disable_tqdm=True)
    clock = UpdateClock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                         callbacks=[type("Clock", (TrainerCallback,), {"on_step_end": clock.tick})()])
    clock.start()
    trainer.train()
    trainer.save_model()
    return {"updates": trainer.state.global_step, "seconds_per_update": clock.seconds_per_update()}


class UpdateClock:
    """Wall time from the start of training to the end of the last update, over the updates (what
    minilora-train's summary reports as steps_per_second, inverted)."""

    def start(self) -> None:
        self.started, self.last, self.updates = time.time(), None, 0

    def tick(self, *args, **kwargs) -> None:
        self.last, self.updates = time.time(), self.updates + 1

    def seconds_per_update(self) -> float:
        return (self.last - self.started) / self.updates


def run_minilora_train(args) -> dict:
    from minilora_train.loop import train_and_report

    summary = train_and_report(args)
    return {"updates": summary["updates"], "seconds_per_update": 1 / summary["steps_per_second"]}


def measure(args, adapter_dir: str, probe) -> dict:
    """Perplexities (base and adapted) and chat drift of the adapter in ``adapter_dir``, each
    measured on the demo's windows and prompts."""
    import minilora
    from minilora_train import data
    from minilora_train.forgetting import drift
    from minilora_train.evaluate import perplexity
    from minilora_train.forgetting import general_eval_windows

    model, tokenizer = load_base(args)
    windows = {"medical": data.cap_windows(data.prepare_data(args, tokenizer).validation, args.max_eval_samples),
               "general": general_eval_windows(args, tokenizer)}
    minilora.load_adapter(model, adapter_dir)
    result = {}
    for name, w in windows.items():
        with minilora.disable_adapters(model):
            base = perplexity(model, w.input_ids, w.labels, batch_size=args.per_device_eval_batch_size)
        adapted = perplexity(model, w.input_ids, w.labels, batch_size=args.per_device_eval_batch_size)
        result[name] = {"base": base["perplexity"], "adapted": adapted["perplexity"], "windows": len(w),
                        "change_percent": 100 * (adapted["perplexity"] - base["perplexity"]) / base["perplexity"]}
    result["chat_drift"] = drift.chat_drift(model, probe)
    return result


def base_probe(args):
    """The base's own greedy answers to the demo's everyday prompts (what chat drift is measured against)."""
    from minilora_train.forgetting import drift

    model, tokenizer = load_base(args)
    return drift.probe_base(model, tokenizer, drift.load_prompts()[:args.chat_drift_prompts])


def machine() -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpus = os.cpu_count() or 1
    return {"cpu": platform.processor() or platform.machine(), "cpus": cpus, "threads": torch.get_num_threads(),
            "load_average_1min": load, "loaded": load is not None and load > 0.5 * cpus}


def table(results: dict) -> str:
    lines = ["| run | medical ppl (base → adapted) | general ppl (base → adapted) | chat drift (nats/token) | s per update |",
             "|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        m, g = r["medical"], r["general"]
        lines.append(f"| {name} | {m['base']:.2f} → {m['adapted']:.2f} ({m['change_percent']:+.1f}%) | "
                     f"{g['base']:.2f} → {g['adapted']:.2f} ({g['change_percent']:+.1f}%) | "
                     f"{r['chat_drift']['drift']:+.3f} | {r['seconds_per_update']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="minilora-train,sft", help="comma-separated: minilora-train, sft")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "minilora-sft-medquad"),
                        help="folder for both runs' outputs (not the working directory: it is often the repository)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--max_steps", type=int, help="updates per run (default: the demo's 45)")
    options = parser.parse_args(argv)
    runs = [r.strip() for r in options.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - {"minilora-train", "sft"})
    if unknown:
        parser.error(f"--runs: unknown run(s) {', '.join(unknown)}; choose from minilora-train, sft")

    from minilora_train.base_model import convert_gguf, packaged_smollm2

    base_dir = str(convert_gguf(packaged_smollm2()))
    results = {"machine": machine(), "base": base_dir, "runs": {}}
    probe = base_probe(demo_args(options.out, base_dir))
    records = chat_records("train")
    for name in runs:
        args = demo_args(os.path.join(options.out, name), base_dir)
        if options.max_steps:
            args = dataclasses.replace(args, max_steps=options.max_steps)
        timing = run_sft(args, records) if name == "sft" else run_minilora_train(args)
        results["runs"][name] = {**timing, **measure(args, args.output_dir, probe), "bf16": args.bf16,
                                 "tokens_per_update": args.per_device_train_batch_size * args.max_seq_length,
                                 "machine_after": machine()}
        if options.json:  # after each run: an interrupted comparison keeps what it measured
            with open(options.json, "w") as f:
                json.dump(results, f, indent=2)
                f.write("\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    # transformers and accelerate put the model on XLA's CPU device whenever torch_xla is installed,
    # even with use_cpu=True; this keeps them on the plain CPU (docs/trainers.md, "torch_xla"). It
    # must precede their import, which every function above defers.
    os.environ.setdefault("USE_TORCH_XLA", "0")
    sys.exit(main())
