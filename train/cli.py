"""``minilora-train``: parse the flags (docs/training.md), run, and turn user errors into one line + exit 2."""

from __future__ import annotations

import sys
from typing import Optional

from .command import missing_app_packages, quiet_start, run_command
from .config import UsageError, parse_args


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def train() -> int:
        args = parse_args(argv)
        quiet_start(args.device)
        missing = missing_app_packages()
        if missing:
            raise UsageError(missing)
        if args.is_demo:
            from .demo import run_demo

            run_demo(args)
        else:
            from . import distributed
            from .device import Device
            from .loop import train_and_report

            device = Device.start(args)
            summary = train_and_report(args, device)
            distributed.finish()  # torchrun: every rank got here; the process group ends before exit
            if not summary.get("stopped") and device.is_main:  # torchrun: once, from rank 0
                print_summary(summary)
        return 0

    return run_command("minilora-train", argv, train)


def print_summary(summary: dict) -> None:
    base, final = summary["base"], summary["final"]
    print(f"done: {summary['updates']} updates in {summary['wall_seconds']:.0f} s on {summary['device']}")
    for name in final:
        b, f = base[name]["perplexity"], final[name]["perplexity"]
        print(f"  {name} perplexity: {b:,.2f} -> {f:,.2f} ({100 * (f - b) / b:+.1f}%)")
    full = summary.get("full_finetune")
    if full:
        for name in full["final"]:
            b, f = full["base"][name]["perplexity"], full["final"][name]["perplexity"]
            print(f"  {name} perplexity, full fine-tuning: {b:,.2f} -> {f:,.2f} ({100 * (f - b) / b:+.1f}%)")
    print(f"  outputs in {summary['output_dir']} (report: report.md)")


if __name__ == "__main__":
    sys.exit(main())
