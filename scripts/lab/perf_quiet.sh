#!/usr/bin/env bash
# The CPU measurements of docs/benchmarks.md's "SmolLM2's shape on two CPU cores", in one go. Run it
# on a quiet machine (nothing else running): the figures are times, and under load they mean
# nothing. One process at a time; docs/benchmarks.md says how long it takes and how much memory.
#
# Writes (each also as .md, the tables):
#   docs/measurements/perf-steps-smollm2-cpu.json   training + speed sections at 8 x 128: minilora
#       vs PEFT at dropout 0 and 0.05 (minilora by both mask paths), full fine-tuning (LoRA / full
#       vs the FLOPs ratio), and minilora at float32 / bf16 autocast / bf16 weights, all layers / top 8
#   docs/measurements/perf-loop-smollm2-cpu.json    the app's loop (the default, chunked loss; with
#       full logits; with MINILORA_MALLOC_TRIM=1) vs a bare loop, 8 x 128
#   docs/measurements/perf-chunked-smollm2-8x512-cpu.json   the app with the chunked loss vs full logits, 8 x 512
#   docs/measurements/perf-compile-smollm2-cpu.json   the app with --compile (inductor) vs eager, 8 x 128: update
#       time, the warm-up (compiling the 30-layer model's training graph) and compiles after it
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=docs/measurements
bench() { "$PYTHON" -m minilora_bench --shape "$1" --threads 2 "${@:3}" --json "$OUT/$2.json" --markdown "$OUT/$2.md"; }

bench smollm2-135m perf-steps-smollm2-cpu --only training,speed --rounds 4 --warmup 1 --memory-steps 0
bench smollm2-135m perf-loop-smollm2-cpu --only loop --loop-rows app,app-full,app-trim,bare --loop-updates 5 --loop-rounds 2
bench smollm2-135m,seq=512 perf-chunked-smollm2-8x512-cpu --only loop --loop-rows app,app-full \
    --loop-updates 4 --loop-rounds 1
bench smollm2-135m perf-compile-smollm2-cpu --only loop --loop-rows app,app-compile --loop-updates 5 --loop-rounds 1
echo "done: $OUT/perf-*.json"
