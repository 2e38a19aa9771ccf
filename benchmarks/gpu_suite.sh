#!/usr/bin/env bash
# The benchmarks with real sizes on the GPU host (one H100/H200, no network); results as JSON + Markdown under $OUT.
#
# Before (on the dev machine, from the project root): bash ../shared/gpu/make-carry.sh diffusers
#   (the GPU image lacks zarr, numcodecs, webdataset and diffusers; .carry/ travels with the checkout).
# On the GPU host, from the project root:           bash benchmarks/gpu_suite.sh
#   (sources .carry/setup.sh itself when it is there). Try it here first: DEVICE=cpu SMALL=1 bash benchmarks/gpu_suite.sh
# Budget: the whole suite needs about 15-20 minutes of GPU time; pick what fits with ONLY (e.g. ONLY="smoke extract_32px
# accuracy"). Each step runs even if an earlier one failed (except a failed smoke test, which stops everything), and
# the exit status says whether any failed. Torch threads stay at 1 in the benchmarks (the work is on the GPU).
# accuracy: the Fashion-MNIST suite (benchmarks/accuracy_fmnist.py --profile gpu), all parts at once, ACC_JOBS student
# jobs sharing the GPU, stopped after ACC_SECONDS; the table then covers the jobs that finished. ACC_PARTS picks parts,
# ACC_SEEDS seeds (e.g. ACC_SEEDS=1 for a second seed next to earlier results), ACC_MERGE an earlier results JSON of the
# same profile whose other rows join the table (ACC_MERGE=benchmarks/results/gpu/accuracy_fmnist_gpu.json)
# (third session: ONLY="smoke accuracy" ACC_PARTS="balanced unlabeled" ACC_JOBS=10 DEADLINE=560 took 530 s; all three
# parts with 16 jobs would need ~10 minutes). A call cut by its time limit resumes from the epoch checkpoints.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .carry/setup.sh ] && [ "${SMALL:-0}" != 1 ]; then source .carry/setup.sh; fi  # cp312 wheels: GPU host only
if [ -d .carry/data/fashion-mnist ]; then FMNIST=${FMNIST:-$PWD/.carry/data/fashion-mnist}; fi
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
# scratch inside the checkout (ignored by git): it stays on a warm GPU machine between calls, so a second call resumes
export GENDD_BENCH_WORK=${GENDD_BENCH_WORK:-$PWD/outputs/gpu-work}
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
  N=200; N224=8; LN=16; SIZES=(500 1000 2000); SHARD=100; SEEDS=1; MP=no; STREAM_SIZES=(100 400 1600)
  ACC_PROFILE=${ACC_PROFILE:-tiny}; ACC_JOBS=${ACC_JOBS:-2}
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
      --out "$smoke/eval" --steps 2 --n-samples 1; } >"$OUT/smoke.log" 2>&1; then
    tail -n 20 "$OUT/smoke.log"
    echo "smoke test failed: stopping (see $OUT/smoke.log)"
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
# Fashion-MNIST accuracy (issue: GenDD vs KD/KL/CE): all parts, student jobs sharing the GPU, under a time limit.
if wanted accuracy; then
  echo "== accuracy"
  started=$SECONDS
  read -r -a parts <<<"${ACC_PARTS:-balanced unlabeled longtail}"
  acc=(benchmarks/accuracy_fmnist.py --profile "${ACC_PROFILE:-gpu}" --part "${parts[@]}"
    --root "$GENDD_BENCH_WORK/acc" --results "$OUT" --name accuracy_fmnist_gpu --parallel "${ACC_JOBS:-16}"
    --seeds ${ACC_SEEDS:-0} ${ACC_MERGE:+--merge "$ACC_MERGE"}
    ${FMNIST:+--data "$FMNIST"})
  # ACC_SECONDS, or what is left of DEADLINE (seconds since this script started) minus time for the report
  limit=${ACC_SECONDS:-$((${DEADLINE:-560} - SECONDS - 15))}
  echo "   time limit ${limit} s"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 >"$OUT/gpu_util.csv" 2>/dev/null &
  smi=$!
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} timeout "$limit" "$PY" "${acc[@]}" >"$OUT/accuracy.log" 2>&1 || failed+=(accuracy)
  kill "$smi" 2>/dev/null
  "$PY" "${acc[@]}" --report-only >/dev/null 2>&1  # the table of whatever finished, even after the time limit
  mkdir -p "$OUT/accuracy_runs"
  (cd "$GENDD_BENCH_WORK/acc" && find . \( -name metrics.json -o -name train.json -o -name "*.log" \
    -o -name teacher.json \) -print0 | tar -czf "$OUT/accuracy_runs/runs.tgz" --null -T - 2>/dev/null)
  tail -n 30 "$OUT/accuracy_fmnist_gpu.md" 2>/dev/null
  echo "   ($((SECONDS - started)) s)"
fi
# 2. what the cache buys: digits at a GPU batch, and the large teacher on 224-px images
run cache_speedup benchmarks/bench_cache_speedup.py "${CACHE[@]}"
# 3. storage per codec on real (trained) teacher features
run storage benchmarks/bench_storage.py --teachers "${TSTORE[@]}" --views 8
# 4. sampling: the digits GenDD student, 5 sampling seeds per setting
run sampling benchmarks/bench_sampling.py --seeds "$SEEDS"
# 5. scaling: 1x / 4x / 16x samples, streaming
run scaling benchmarks/bench_scaling.py --sizes "${SIZES[@]}" --shard-size "$SHARD" --no-tracemalloc
# 6. streaming: distill --data stream vs memory at 1x / 4x / 16x samples, peak memory and images/s (docs/streaming.md)
run streaming benchmarks/bench_streaming.py --sizes "${STREAM_SIZES[@]}" --image-size 128 --threads 8 --tag gpu
echo "results in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (see $OUT/<name>.log)"
  exit 1
fi
