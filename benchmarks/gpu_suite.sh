#!/usr/bin/env bash
# The benchmarks with real sizes on the GPU host (one H100/H200, no network); results as JSON + Markdown under $OUT.
#
# Before (on the dev machine, from the project root): bash ../shared/gpu/make-carry.sh diffusers
#   (the GPU image lacks zarr, numcodecs, webdataset and diffusers; .carry/ travels with the checkout).
# On the GPU host, from the project root:           bash benchmarks/gpu_suite.sh
#   (sources .carry/setup.sh itself when it is there). Try it here first: DEVICE=cpu SMALL=1 bash benchmarks/gpu_suite.sh
# Budget: about 8-10 minutes of GPU time in all; each benchmark runs even if an earlier one failed, and the exit
# status says whether any failed. Torch threads stay at 1 (the work is on the GPU; decode/compress are not torch).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .carry/setup.sh ]; then source .carry/setup.sh; fi
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
export GENDD_BENCH_WORK=${GENDD_BENCH_WORK:-/tmp/gendd-bench}
mkdir -p "$OUT"
failed=()
run() {
  local name=$1
  shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="storage sampling": a subset
  echo "== $name: $*"
  local started=$SECONDS
  "$PY" "$@" --device "$DEVICE" --out "$OUT" >"$OUT/$name.log" 2>&1 || failed+=("$name")
  tr '\r' '\n' <"$OUT/$name.log" | grep -v -E 'it/s|view/s|img/s|^\s*$' | tail -n 12
  echo "   ($((SECONDS - started)) s)"
}
if [ "${SMALL:-0}" = 1 ]; then  # a dry run of the suite's commands at CPU sizes
  N=200; N224=8; LN=16; SIZES=(500 1000 2000); SHARD=100; SEEDS=1; MP=no
  T32=(test_resnet); T224=(test_resnet); TSTORE=(test_resnet)
  CACHE=(--batch 64 --large-n 16 --large-batch 8 --large-views 2 --steps 2 --rounds 2)
else
  N=20000; N224=2048; LN=512; SIZES=(5000 20000 80000); SHARD=1000; SEEDS=5; MP=bf16
  T32=(resnet18 resnet50); T224=(resnet50 vit_base_patch16_224); TSTORE=(resnet18 resnet50)
  CACHE=(--batch 256 --large-n 512 --large-batch 64 --large-views 2 --steps 10 --rounds 3)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
# 1. extraction efficiency: CIFAR-like 32-px images (fast teachers: decode and writing matter most), then 224-px
#    RGB images with a resnet50 in bf16 (PNG decode of large images against a fast GPU forward).
run extract_32px benchmarks/bench_extract.py --tag 32px --data synthetic --n "$N" --image-size 32 --channels 3 \
  --teachers "${T32[@]}" --views 8 --batch 1024 --shard-size "$SHARD"
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
echo "results in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (see $OUT/<name>.log)"
  exit 1
fi
