#!/usr/bin/env bash
# Every benchmark once with its quick (CPU) defaults; results in benchmarks/results/ (or $OUT), named
# <benchmark>_<machine> (machine: cpu without CUDA, else the GPU, e.g. h100).
# Usage, from anywhere:  bash benchmarks/run_all.sh [extra options passed to every script, e.g. --threads 2]
# About 7-9 minutes on 2 shared CPU cores; bench_sampling is most of it (it trains a teacher and a GenDD student the
# first time, then samples the 360 val images with every sampler, the 100-step reference with 5 samples being ~2 min).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results}
LOGS=$(mktemp -d)
run() {
  echo "== $*"
  local log="$LOGS/$(basename "$1" .py).log" status=0
  "$PY" "$@" --out "$OUT" "${EXTRA[@]}" >"$log" 2>&1 || status=$?
  tr '\r' '\n' <"$log" | grep -v -E 'it/s|view/s|img/s|^\s*$' | tail -n 25
  if [ "$status" -ne 0 ]; then echo "failed ($status): full log $log"; exit "$status"; fi
}
EXTRA=("$@")
run benchmarks/bench_extract.py --cprofile
run benchmarks/bench_cache_speedup.py
run benchmarks/bench_storage.py
run benchmarks/bench_sampling.py
run benchmarks/bench_scaling.py
echo "results: $OUT/{extract,cache_speedup,storage,sampling,scaling}_<machine>.{json,md}"
