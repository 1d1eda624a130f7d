#!/usr/bin/env bash
# The CPU measurements of docs/benchmarks.md's "SmolLM2's shape on two CPU cores" and README's
# "Speed on two CPU cores", in one go. Run it on a quiet machine (nothing else running): the figures
# are times, and under load they mean nothing.
#
# Estimated wall time on a quiet 2-core AMD EPYC: about 15 minutes plus the --compile run's warm-up
# (training and speed sections ~5 min, the loop at 8 x 128 ~5.5 min, the chunked loss at 8 x 512
# ~4.5 min). The estimate comes
# from the per-step times of the last quiet runs (4.7 s per float32 LoRA step at 8 x 128, 1.5x
# that with the chunked loss, about 4.5x at 8 x 512) and the app's start-up; the smoke runs of
# this script's commands were taken at tiny shapes on a machine at load 10-12, which times nothing.
# Peak memory: about 8 GB (the 8 x 512 app run); one process at a time.
#
# Writes (each also as .md, the tables):
#   docs/measurements/perf-steps-smollm2-cpu.json   training + speed sections at 8 x 128: minilora
#       vs PEFT at dropout 0 and 0.05 (minilora by both mask paths), full fine-tuning (LoRA / full
#       vs the FLOPs ratio), and minilora at float32 / bf16 autocast / bf16 weights, all layers / top 8
#   docs/measurements/perf-loop-smollm2-cpu.json    the app's loop (the default, chunked loss; with
#       MINILORA_MALLOC_TRIM=1; with glibc's mmap threshold fixed at 64 KiB) vs a bare loop, 8 x 128
#   docs/measurements/perf-chunked-smollm2-8x512-cpu.json   the app with the chunked loss vs full logits, 8 x 512
#   docs/measurements/perf-compile-smollm2-cpu.json   the app with --compile (inductor) vs eager, 8 x 128: update
#       time, the warm-up (compiling the 30-layer model's training graph: ~5-8 min estimated from 58 s at 4
#       layers on the loaded machine) and compiles after it
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
