#!/usr/bin/env bash
# The benchmarks with real sizes on the GPU host (one H100/H200, no network); results as JSON + Markdown under $OUT.
#
# Before (on the dev machine, from the project root): bash ../shared/gpu/make-carry.sh diffusers
#   (the GPU image lacks zarr, numcodecs, webdataset and diffusers; .carry/ travels with the checkout).
# On the GPU host, from the project root:           bash benchmarks/gpu_suite.sh
#   (sources .carry/setup.sh itself when it is there). Try it here first: DEVICE=cpu SMALL=1 bash benchmarks/gpu_suite.sh
# Budget: on an H100, smoke takes seconds and extract_32px (N=10000 REPEATS=2), cache_speedup, storage + sampling and
# scaling 26-68 s each (extract_224px and streaming have no GPU figures); pick what fits with ONLY (e.g.
# ONLY="smoke extract_32px"). Each step runs even if an earlier one failed (except a failed smoke test, which stops everything), and
# the exit status says whether any failed. Torch threads stay at 1 in the benchmarks (the work is on the GPU).
# Results are named <benchmark>_<gpu>[_<variant>] (e.g. extract_h100_32px); logs go to $OUT/logs/.
# The Fashion-MNIST comparison is a DVC pipeline (benchmarks/fmnist) and runs where DVC is installed, not here.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .carry/setup.sh ] && [ "${SMALL:-0}" != 1 ]; then source .carry/setup.sh; fi  # cp312 wheels: GPU host only
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
# scratch inside the checkout (ignored by git): it stays on a warm GPU machine between calls, so a second call resumes
export GENDD_BENCH_WORK=${GENDD_BENCH_WORK:-$PWD/outputs/gpu-work}
if [ "${SMALL:-0}" = 1 ]; then OUT=${OUT:-outputs/gpu-suite-small}; else OUT=${OUT:-benchmarks/results}; fi
LOGS=$OUT/logs
mkdir -p "$LOGS"
failed=()
run() {
  local name=$1
  shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="storage sampling": a subset
  echo "== $name: $*"
  local started=$SECONDS
  "$PY" "$@" --device "$DEVICE" --out "$OUT" >"$LOGS/$name.log" 2>&1 || failed+=("$name")
  tr '\r' '\n' <"$LOGS/$name.log" | grep -v -E 'it/s|view/s|img/s|^\s*$' | tail -n 12
  echo "   ($((SECONDS - started)) s)"
}
if [ "${SMALL:-0}" = 1 ]; then  # a dry run of the suite's commands at CPU sizes
  N=200; N224=8; LN=16; SIZES=(500 1000 2000); SHARD=100; SEEDS=1; MP=no; STREAM_SIZES=(100 400 1600)
  T32=(test_resnet); T224=(test_resnet); TSTORE=(test_resnet)
  CACHE=(--batch 64 --large-n 16 --large-batch 8 --large-views 2 --steps 2 --rounds 2)
else
  N=${N:-20000}; N224=2048; LN=512; SIZES=(5000 20000 80000); SHARD=1000; SEEDS=5; MP=bf16
  STREAM_SIZES=(2000 8000 32000)
  read -r -a T32 <<<"${T32_TEACHERS:-resnet18 resnet50}"; T224=(resnet50 vit_base_patch16_224); TSTORE=(resnet18 resnet50)
  CACHE=(--batch 256 --large-n 512 --large-batch 64 --large-views 2 --steps 10 --rounds 3)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
wanted() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
# 0. smoke: the whole CLI on digits for one epoch (prepare, teacher, extract, gendd distill, evaluate), so that a
#    version difference on the host fails in seconds instead of after minutes of training.
if wanted smoke; then
  echo "== smoke"
  smoke=$GENDD_BENCH_WORK/smoke
  rm -rf "$smoke"
  if ! { "$PY" -m stages.app prepare --spec data_specs/digits.yaml --out "$smoke/shards" &&
    "$PY" -m stages.app teacher --shards "$smoke/shards" --out "$smoke/teacher" --model test_resnet --epochs 1 &&
    "$PY" -m stages.app extract --shards "$smoke/shards" --teacher "$smoke/teacher" --out "$smoke/cache" --views 2 &&
    "$PY" -m stages.app distill --shards "$smoke/shards" --cache "$smoke/cache" --out "$smoke/student" \
      --student test_resnet --method gendd --epochs 1 --head-width 64 --token-dim 32 --head-prediction v_prediction &&
    "$PY" -m stages.app evaluate --shards "$smoke/shards" --cache "$smoke/cache" --student "$smoke/student" \
      --out "$smoke/eval" --steps 2 --n-samples 1; } >"$LOGS/smoke.log" 2>&1; then
    tail -n 20 "$LOGS/smoke.log"
    echo "smoke test failed: stopping (see $LOGS/smoke.log)"
    exit 1
  fi
  echo "   smoke ok ($SECONDS s since start)"
fi
# 1. extraction efficiency: CIFAR-like 32-px images (fast teachers: decode and writing matter most), then 224-px
#    RGB images with a resnet50 in bf16 (PNG decode of large images against a fast GPU forward).
run extract_32px benchmarks/bench_extract.py --tag 32px --data synthetic --n "$N" --image-size 32 --channels 3 \
  --teachers "${T32[@]}" --views 8 --batch 1024 --shard-size "$SHARD" --repeats "${REPEATS:-3}"
run extract_224px benchmarks/bench_extract.py --tag 224px --data synthetic --n "$N224" --image-size 224 --channels 3 \
  --teachers "${T224[@]}" --views 4 --batch 256 --shard-size 256 --mixed-precision "$MP"
# 2. what the cache buys: digits at a GPU batch, and the large teacher on 224-px images
run cache_speedup benchmarks/bench_cache_speedup.py "${CACHE[@]}"
# 3. storage per codec on real (trained) teacher features
run storage benchmarks/bench_storage.py --teachers "${TSTORE[@]}" --views 8
# 4. sampling: the digits GenDD student, 5 sampling seeds per setting
run sampling benchmarks/bench_sampling.py --seeds "$SEEDS"
# 5. scaling: 1x / 4x / 16x samples, streaming
run scaling benchmarks/bench_scaling.py --sizes "${SIZES[@]}" --shard-size "$SHARD" --no-tracemalloc
# 6. streaming: distill --data stream vs memory at 1x / 4x / 16x samples, peak memory and images/s (docs/streaming.md)
run streaming benchmarks/bench_streaming.py --sizes "${STREAM_SIZES[@]}" --image-size 128 --threads 8 --tag 128px
echo "results in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (see $LOGS/<name>.log)"
  exit 1
fi
