#!/usr/bin/env bash
# The main job on the embedded default: set up .venv if needed, then run minilora-train with
# no model and no data (the embedded medical LoRA fine-tuning). Extra flags pass through.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/venv.sh"
exec "$root/.venv/bin/minilora-train" "$@"
