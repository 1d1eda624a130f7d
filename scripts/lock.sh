#!/usr/bin/env bash
# Regenerate the locks that scripts/venv.sh installs, from pyproject.toml's ranges as PyPI
# resolves them today. Upgrading the lock is a deliberate step: run `scripts/test.sh --newest`
# first, then this, then the whole suite in the new .venv (docs/install.md).
#
#   requirements/lock.txt       every package and every transitive dependency of the train, xla
#                               and dev extras, with hashes; one universal file whose environment
#                               markers cover each platform and Python version (torch_xla only on
#                               Linux x86_64)
#   requirements/demo-base.txt  the demo's base model package, pinned with hashes, no dependencies
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools=".venv-tools"
uv_version="0.13.9"
if [ ! -x "$tools/bin/uv" ] || [ "$("$tools/bin/uv" --version | cut -d' ' -f2)" != "$uv_version" ]; then
    "${PYTHON:-python3}" -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet "uv==$uv_version"
fi
min_python="$(sed -n 's/^requires-python = ">=\([0-9.]*\)"$/\1/p' pyproject.toml)"
"$tools/bin/uv" pip compile --quiet --universal --python-version "$min_python" --generate-hashes \
    --extra train --extra xla --extra dev --custom-compile-command scripts/lock.sh \
    pyproject.toml requirements/lock.in -o requirements/lock.txt
"$tools/bin/uv" pip compile --quiet --universal --no-deps --generate-hashes --custom-compile-command scripts/lock.sh \
    requirements/demo-base.in -o requirements/demo-base.txt
echo "locked: $(grep -c '^[a-z]' requirements/lock.txt) pinned lines in requirements/lock.txt"
