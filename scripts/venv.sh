#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) with everything installed:
# the package itself (editable) with the training app's extra, the XLA extra (torch 2.9.0 +
# torch_xla 2.9.0 on Linux x86_64) and the development extra. Re-installs only when pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.minilora-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    extras="train,dev"
    if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then extras="train,xla,dev"; fi
    .venv/bin/python -m pip install --quiet -e ".[${extras}]"
    echo "$want" > "$stamp"
fi
