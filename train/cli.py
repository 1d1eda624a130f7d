"""``minilora-train``: parse the flags (docs/training.md), run, and turn user errors into one line + exit 2."""

from __future__ import annotations

import re
import sys
import traceback
from typing import Optional

from minilora import AdapterLoadError

from .config import UsageError, parse_args


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = parse_args(argv)
        if args.is_demo:
            from .demo import run_demo

            run_demo(args)
        else:
            from .device import Device
            from .loop import train_and_report

            device = Device.start(args)
            summary = train_and_report(args, device)
            if not summary.get("stopped") and device.is_main:  # torchrun: once, from rank 0
                print_summary(summary)
        return 0
    except (UsageError, AdapterLoadError) as e:
        if debug:
            traceback.print_exc()
        # One line: a heading "…:" runs on into its list, list items are joined with "; ".
        message = re.sub(r"\s*\n\s*", "; ", re.sub(r":\s*\n\s*", ": ", str(e).strip()))
        print(f"minilora-train: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minilora-train: interrupted", file=sys.stderr)
        return 130


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
