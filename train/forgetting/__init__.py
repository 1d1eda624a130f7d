"""Forgetting: how far a fine-tuning run moved the base away from what it could do, and the guard
against it. The training loop calls ``Check`` at its named points (check.py); the rest is the
measurements and remedies it runs:

- drift.py: chat drift, the adapted model's score of the base's own answers to everyday requests;
- mc.py: the medical multiple-choice questions, base against adapted, with 95% intervals;
- replay.py: the forgetting guard (self-distillation on the base's own answers, on by default for
  instruct bases) and general-text replay, mixed into the training windows;
- answers.py: the base's greedy answers that both use, cached on disk;
- report.py: report.md, with --compare_full_finetune LoRA beside full fine-tuning
  (``comparison_args``).

docs/forgetting.md has the measurements behind the guard's default and the LoRA/full comparison.
"""

from __future__ import annotations

import dataclasses

from .check import Check, general_eval_windows, guard_line
from .report import write_report

__all__ = ["Check", "comparison_args", "general_eval_windows", "guard_line", "write_report"]


def comparison_args(args):
    """The --compare_full_finetune run's settings (full fine-tuning with the same data, steps and
    seed, into <output_dir>/full_finetune), or None when the run asks for no comparison."""
    if not (args.compare_full_finetune and args.use_lora):
        return None
    full = dataclasses.replace(
        args, use_lora=False, output_dir=f"{args.output_dir.rstrip('/')}/full_finetune",
        learning_rate=args.full_finetune_learning_rate, compare_full_finetune=False, overwrite_output_dir=True,
        resume_from_checkpoint=None, report_to="none")
    if hasattr(args, "given"):  # parse_args' record of the flags given, which replace() does not carry
        full.given = args.given
    return full
