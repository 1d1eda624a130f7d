#!/usr/bin/env bash
# The whole test suite: set up .venv from the lock if needed, then run pytest. Extra args go to pytest.
#
# scripts/test.sh --newest [pytest args]: the same suite against the newest releases that
# pyproject.toml allows, in two environments of their own beside .venv (which is left alone):
#   .venv-newest-eager  the train and dev extras on the newest torch, without torch_xla: the
#                       eager CPU and CUDA paths of everyone who is not on a TPU (XLA tests skip)
#   .venv-newest-xla    the train, xla and dev extras as they resolve (torch_xla pins its torch)
# Run it before upgrading the lock (scripts/lock.sh); docs/install.md says how to read it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ "${1:-}" != "--newest" ]; then
    "$root/scripts/venv.sh"
    exec .venv/bin/python -m pytest "$@"
fi
shift
python="${PYTHON:-python3}"
# Some machines cap torch through a global pip constraint file; the newest check must see past it.
no_constraints="$(mktemp)"
trap 'rm -f "$no_constraints"' EXIT
status=0
for flavour in eager xla; do
    venv=".venv-newest-$flavour"
    extras="train,dev"
    [ "$flavour" = xla ] && extras="train,xla,dev"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    # setuptools too: minilora is installed as .venv installs it, and the wheel test builds without isolation
    PIP_CONSTRAINT="$no_constraints" "${pip[@]}" --upgrade pip setuptools
    # the output only on failure: setuptools notes that every editable install is one
    if ! log="$(PIP_CONSTRAINT="$no_constraints" "${pip[@]}" --upgrade --no-build-isolation -e ".[$extras]" 2>&1)"; then
        echo "$log" >&2
        exit 1
    fi
    "${pip[@]}" --require-hashes --no-deps -r requirements/demo-base.txt
    "$venv/bin/python" - "$flavour" <<'PY'
import importlib.metadata, sys
names = ["torch", "torch_xla", "transformers", "kernels", "peft", "datasets", "accelerate"]
found = []
for name in names:
    try:
        found.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        pass
print(f"== newest ({sys.argv[1]}): " + ", ".join(found), flush=True)
PY
    "$venv/bin/python" -m pytest "$@" || status=$?
done
exit $status
