"""The embedded default: what ``minilora-train`` runs with no model and no data.

1. real text from the install (fortunes: general English; ICD-10-CM: medical), a BPE tokenizer
   and an untrained small Llama — train/demo_assets.py, cached under ~/.cache/minilora;
2. pre-training of that Llama on the general text only (full fine-tuning with the same loop),
   cached too;
3. LoRA fine-tuning of the base on the medical text through the ordinary path (same loop,
   same device choice as any run), then a summary a person reads in ten seconds.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

from .config import TrainArgs
from .demo_assets import DemoAssets, DemoSettings, prepare_assets, read_fortunes, split_holdout

# The recommended medical LoRA settings (docs/training.md), scaled to a 4M-parameter model and a
# budget of about a minute (60 updates of 8 x 128 tokens: ~70 s with compiles and evaluations on
# 2 cores): r 16, alpha 2r, dropout 0.1, weight decay 0.01, clipping 1.0, warm-up; a higher learning
# rate than the default 5e-4 because the run is ~100x shorter than the 3 epochs it is meant for. Any of these that the
# user gives wins (docs/forgetting.md: at 5e-4 the demo forgets less and adapts less).
DEMO_LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.1, learning_rate=2e-3, weight_decay=0.01,
                 max_grad_norm=1.0, warmup_steps=6, max_steps=60, per_device_train_batch_size=8,
                 per_device_eval_batch_size=32, logging_steps=20, eval_steps=30, max_eval_samples=64,
                 save_epoch_percentage=0.0)


def default_general_validation() -> list[str]:
    """The fortunes held out by the default demo settings: the general text no run trains on."""
    s = DemoSettings()
    return split_holdout(read_fortunes(), s.validation_fraction, s.seed)[1]


def demo_settings(args: TrainArgs) -> DemoSettings:
    s = DemoSettings()
    return dataclasses.replace(s, pretrain_steps=args.demo_pretrain_steps) if args.demo_pretrain_steps else s


def run_demo(args: TrainArgs) -> dict:
    from .loop import train_and_report

    started = time.time()
    settings = demo_settings(args)
    assets = prepare_assets(settings, rebuild=args.rebuild_base)
    print(f"demo: assets in {assets.root}", flush=True)
    pretrain_seconds = 0.0
    if not assets.is_pretrained():
        pretrain_seconds = pretrain_base(assets, args)
    info = assets.pretrained_info()

    lora_args = demo_lora_args(args, assets)
    summary = train_and_report(lora_args)
    summary["pretrain"] = info
    summary["pretrain_seconds_this_run"] = pretrain_seconds
    summary["demo_wall_seconds"] = time.time() - started
    print_demo_summary(summary, assets, lora_args)
    return summary


def _split_dir(assets: DemoAssets, name: str) -> str:
    """A folder holding only ``<name>``'s train and validation files (what --dataset_dir takes)."""
    folder = assets.root / f"{name}-data"
    if not folder.is_dir():
        tmp = assets.root / f".{name}-data.tmp-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        for split in ("train", "validation"):
            shutil.copyfile(getattr(assets, f"{name}_{split}"), tmp / f"{split}.jsonl")
        try:
            os.rename(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another run made it first
    return str(folder)


def pretrain_base(assets: DemoAssets, args: TrainArgs) -> float:
    """Full pre-training of the untrained Llama on the general text; returns seconds spent."""
    from .loop import run

    s = assets.settings
    print(f"demo: pre-training the base on general English for {s.pretrain_steps} updates "
          "(once; cached for later runs)", flush=True)
    started = time.time()
    pre = TrainArgs(
        model_name=str(assets.untrained_dir), tokenizer_name_or_path=str(assets.tokenizer_dir),
        dataset_dir=_split_dir(assets, "general"), output_dir=str(assets.pretrained_dir), overwrite_output_dir=True,
        use_lora=False, max_seq_length=s.seq_len, per_device_train_batch_size=s.pretrain_batch_size,
        per_device_eval_batch_size=32, learning_rate=s.pretrain_lr, warmup_steps=max(1, s.pretrain_steps // 10),
        max_steps=s.pretrain_steps, weight_decay=0.01, max_grad_norm=1.0, logging_steps=50, eval_steps=0,
        save_epoch_percentage=0.0, max_eval_samples=64, general_eval_dataset="none", device=args.device,
        report_to="none", seed=s.seed, tmp_dir=args.tmp_dir)
    summary = run(pre)
    seconds = time.time() - started
    assets.mark_pretrained({"steps": s.pretrain_steps, "seconds": seconds,
                            "untrained_general_perplexity": summary["base"]["validation"]["perplexity"],
                            "general_perplexity": summary["final"]["validation"]["perplexity"]})
    return seconds


def demo_lora_args(args: TrainArgs, assets: DemoAssets) -> TrainArgs:
    """The user's flags, with the demo's model and data, and the demo's settings wherever the
    user gave none (``--learning_rate 5e-4`` is kept although 5e-4 is also the default)."""
    given = getattr(args, "given", None)  # set by parse_args; else: whatever differs from the defaults
    if given is None:
        defaults = TrainArgs()
        given = {k for k in DEMO_LORA if getattr(args, k) != getattr(defaults, k)}
    changes = {k: v for k, v in DEMO_LORA.items() if k not in given}
    return dataclasses.replace(
        args, **changes, use_lora=True, model_name=str(assets.pretrained_dir),
        tokenizer_name_or_path=str(assets.tokenizer_dir), dataset_dir=_split_dir(assets, "medical"),
        max_seq_length=min(args.max_seq_length, assets.settings.seq_len), demo=False,
        overwrite_output_dir=True)  # the demo replaces its previous output


def print_demo_summary(summary: dict, assets: DemoAssets, args: TrainArgs) -> None:
    base, final = summary["base"], summary["final"]
    pre = summary["pretrain"]
    wall = summary["demo_wall_seconds"]
    lines = [
        "",
        f"minilora demo finished in {wall:.0f} s on {summary['device']}"
        + (f" (base pre-training {summary['pretrain_seconds_this_run']:.0f} s, now cached)"
           if summary["pretrain_seconds_this_run"] else " (cached base)"),
        f"  base: {summary['total_params'] - summary['trainable_params']:,d}-parameter Llama pre-trained on general "
        f"English (perplexity {pre.get('untrained_general_perplexity', float('nan')):,.0f} untrained -> "
        f"{pre.get('general_perplexity', float('nan')):,.1f})",
        f"  {'perplexity':<22}{'base':>10}{'LoRA':>10}{'change':>9}",
    ]
    for name, label in (("validation", "medical (ICD-10-CM)"), ("general", "general (fortunes)")):
        if name in final:
            b, f = base[name]["perplexity"], final[name]["perplexity"]
            lines.append(f"  {label:<22}{b:>10,.1f}{f:>10,.1f}{100 * (f - b) / b:>+8.1f}%")
    full = summary.get("full_finetune")
    if full:
        for name, label in (("validation", "medical, full FT"), ("general", "general, full FT")):
            b, f = full["base"][name]["perplexity"], full["final"][name]["perplexity"]
            lines.append(f"  {label:<22}{b:>10,.1f}{f:>10,.1f}{100 * (f - b) / b:>+8.1f}%")
    else:
        lines.append("  (add --compare_full_finetune to also run full fine-tuning with the same data and steps)")
    trainable, total = summary["trainable_params"], summary["total_params"]
    lines += [
        f"  trainable params: {trainable:,d} of {total:,d} ({100 * trainable / total:.2f}%), "
        f"adapter {summary['adapter_bytes'] / 1e6:.2f} MB on disk, {summary['updates']} updates",
        f"  files: {args.output_dir} (adapter, tokenizer, metrics.jsonl, loss.png, report.md)",
        f"  generate: minilora-generate --base_model {assets.pretrained_dir} --adapter {args.output_dir} "
        "--prompt \"Type 2 diabetes mellitus with\"",
    ]
    print("\n".join(lines), flush=True)
