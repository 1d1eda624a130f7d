#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) from the lock: exactly the packages
# CI tested (requirements/lock.txt: the train, xla and dev extras with every dependency pinned and
# hashed; torch_xla on Linux x86_64 only), then minilora itself (editable) and the demo's base
# model. Re-installs only when the lock, pyproject.toml or this script changed.
# scripts/lock.sh regenerates the lock; scripts/test.sh --newest tries the newest releases first.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.minilora-installed"
want="$(cat pyproject.toml scripts/venv.sh requirements/lock.txt requirements/demo-base.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
    "${pip[@]}" --require-hashes --no-deps -r requirements/lock.txt
    "${pip[@]}" --require-hashes --no-deps -r requirements/demo-base.txt
    # minilora itself, built with the locked setuptools: nothing unpinned enters the venv. Its
    # output is shown only on failure: setuptools notes that every editable install is one.
    if ! log="$("${pip[@]}" --no-deps --no-build-isolation -e . 2>&1)"; then
        echo "$log" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
