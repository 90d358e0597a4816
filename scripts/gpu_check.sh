#!/usr/bin/env bash
# The one command to run on a machine with a GPU (CUDA torch, triton, nvcc, ninja; no network needed):
#
#     bash scripts/gpu_check.sh [OUTDIR]      # default OUTDIR: benchmarks/results/<device>/
#
# Steps, each under `timeout`, all within GPU_CHECK_BUDGET seconds (default 480 = 8 min on an
# H200); a failing step does not stop the others:
#   1. info          nvidia-smi, versions, commit, rsir_kernels.available_backends()
#   2. build         python3 setup.py build_ext --inplace (the C++/CUDA extension)
#   3. bench_attn    benchmarks/bench_attn.py with its GPU defaults (bf16, batch 64, RSIR-T):
#                    eager and device time (CUDA-graph replays) of every row
#   4. tests         python3 -m pytest tests -q (junit xml)
#   5. bench_model   benchmarks/bench_model.py (RSIR-T 224x224, batch 64, bf16 autocast):
#                    eager, compile and reduce-overhead training steps of every backend
#   6. train         python -m rsir_kernels.train on fake data, one short epoch per backend
#                    (eager, then compiled for triton): images/s of the training entry point
#   6b. bench_dense  benchmarks/bench_dense.py at 800x1333 and 512x2048 (bf16 autocast):
#                    rsir_tiny's FPN backbone per backend against timm's Swin-T, time, peak
#                    memory and the attention's share (the paper's dense tasks)
#   7. tune          benchmarks/tools/tune_triton.py: num_warps x heads-per-program
#   8. sanitizers    compute-sanitizer memcheck on the GPU tests of the C++/CUDA backend
#                    (tests/test_cpp.py) and of the Triton backend (tests/test_triton.py);
#                    racecheck on scripts/cuda_smoke.py, our kernels only (--kernel-name)
#   (breakdown       benchmarks/tools/gpu_breakdown.py: only with GPU_CHECK_BREAKDOWN=1; the
#                    device-time columns of bench_attn replace it in the default run)
# The benchmarks come before the full test suite and the sanitizers, so that a slow step
# late in the run can't cost the main job.
#
# OUTDIR receives (a few plain files + commit.txt):
# summary.txt (commit, step exit codes, times and the benchmark tables), gpu_check.tar.gz
# (every log and result), bench_attn_cuda_bfloat16.json/.png, bench_model_cuda_bfloat16.json,
# dense_cuda_bfloat16.json,
# junit.xml, tests.log, train.log (junit.xml and the logs are not committed: .gitignore). GPU_CHECK_KEEP_ALL=1 copies every log into OUTDIR/all/ too.
# Environment: PYTHON (default: scripts/pick_python.sh), GPU_CHECK_BUDGET (seconds),
# TRAIN_ARGS (extra arguments of every train run; TRAIN_BACKENDS, default "triton cpp reference"),
# BENCH_ATTN_ARGS / BENCH_MODEL_ARGS / BENCH_DENSE_ARGS / TEST_ARGS (extra arguments; TEST_ARGS="-n 8" runs the
# tests on 8 pytest-xdist workers), SANITIZE_CPP / SANITIZE_TRITON
# (the pytest arguments of the sanitizer runs), GPU_CHECK_SKIP (step names to skip, e.g.
# "build tests" for a dry run of the script on a CPU machine).
# Each step's time limit keeps back a floor for every later step that is not skipped, so a
# smaller budget squeezes the early steps instead of starving the late ones.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# default OUTDIR: benchmarks/results/<device>, e.g. benchmarks/results/nvidia_h200
DEVICE_SLUG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 \
  | tr 'A-Z' 'a-z' | sed -e 's/nvidia //' -e 's/[^a-z0-9]\+/_/g' -e 's/^_//' -e 's/_$//')
DEFAULT_OUT="$ROOT/benchmarks/results/gpu_${DEVICE_SLUG:-unknown}"
mkdir -p "${1:-$DEFAULT_OUT}"
OUTDIR=$(cd "${1:-$DEFAULT_OUT}" && pwd)
cd "$ROOT" || exit 2
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
DIRTY=$(git status --porcelain 2>/dev/null | grep -q . && echo " (with uncommitted changes)")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$WORK/results"
PY=${PYTHON:-$(bash scripts/pick_python.sh)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET:-480}
START=$(date +%s)
STEPS=()
SUMMARY="$WORK/summary.txt"

elapsed() { echo $(( $(date +%s) - START )); }

# The steps in order, each with the floor (seconds) kept back for it while earlier steps run.
ORDER=(info:0 build:0 backends:0 bench_attn:60 tests:60 bench_model:60 train:30 bench_dense:30 breakdown:0 tune:20
       sanitize_memcheck_cpp:20 sanitize_memcheck_triton:20 sanitize_racecheck_cpp:15 sanitize_racecheck_triton:15)

skipped() { case " ${GPU_CHECK_SKIP:-} " in *" $1 "*) return 0 ;; esac; return 1; }

reserve_after() {  # reserve_after NAME: the floors of the steps after NAME that will run
  local total=0 seen=0 entry
  for entry in "${ORDER[@]}"; do
    if [ $seen = 1 ] && ! skipped "${entry%%:*}"; then total=$(( total + ${entry##*:} )); fi
    if [ "${entry%%:*}" = "$1" ]; then seen=1; fi
  done
  echo $total
}

# run_step NAME CAP CMD...: runs CMD with a timeout of min(CAP, time left - the floors of the
# later steps); output in $WORK/NAME.log.
run_step() {
  local name=$1 cap=$2
  shift 2
  if skipped "$name"; then note_step "$name" "GPU_CHECK_SKIP"; return 0; fi
  local reserve
  reserve=$(reserve_after "$name")
  local left=$(( START + BUDGET - $(date +%s) - reserve ))
  local limit=$cap
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped, out of time" | tee -a "$WORK/$name.log"
    STEPS+=("$name|skipped (out of time)|0")
    return 0
  fi
  echo "== [$(elapsed)s] $name (timeout ${limit}s)"
  local t0
  t0=$(date +%s)
  { echo "\$ $*"; echo; } > "$WORK/$name.log"
  timeout -k 10 "$limit" "$@" >> "$WORK/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  local what="exit $rc"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then what="exit $rc (timed out after ${limit}s)"; fi
  STEPS+=("$name|$what|$took")
  tail -n 4 "$WORK/$name.log" | sed 's/^/   | /'
  return 0
}

note_step() {  # note_step NAME TEXT: a step that did not run, and why
  echo "== $1: $2" | tee "$WORK/$1.log"
  STEPS+=("$1|skipped ($2)|0")
}

# ---------------------------------------------------------------- 1. info
run_step info 30 bash -c "
  nvidia-smi || echo 'nvidia-smi: not found';
  echo; '$PY' --version; command -v nvcc && nvcc --version | tail -n 2;
  command -v compute-sanitizer || echo 'compute-sanitizer: not found';
  '$PY' -c 'import torch, platform; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())';
  '$PY' -c 'import triton; print(\"triton\", triton.__version__)';
  git -C '$ROOT' rev-parse HEAD 2>/dev/null; git -C '$ROOT' status --short 2>/dev/null | head -n 20"

# ---------------------------------------------------------------- 2. build
run_step build 180 "$PY" setup.py build_ext --inplace
run_step backends 30 "$PY" -c "import rsir_kernels as rk; [print(f'{n:10s}', s) for n, s in rk.available_backends().items()]"

# ---------------------------------------------------------------- 3. benchmarks of the primitive
# shellcheck disable=SC2086
run_step bench_attn 120 "$PY" benchmarks/bench_attn.py --no-progress --out "$WORK/results" ${BENCH_ATTN_ARGS:-}

# ---------------------------------------------------------------- 4. the test suite on the GPU
# pytest-xdist, where installed, spreads the suite over 8 workers (114 s instead of minutes on an H200)
if [ -z "${TEST_ARGS+set}" ] && "$PY" -c "import xdist" 2>/dev/null; then TEST_ARGS="-n 8"; fi
# shellcheck disable=SC2086
run_step tests 150 "$PY" -m pytest tests -q -ra --junitxml="$WORK/junit.xml" ${TEST_ARGS:-}

# ---------------------------------------------------------------- 5. the model
# eager first for every backend, then the compiled modes (the JSON is written after every row)
# shellcheck disable=SC2086
run_step bench_model 150 "$PY" benchmarks/bench_model.py --no-progress --out "$WORK/results" ${BENCH_MODEL_ARGS:-}

# ---------------------------------------------------------------- 6. the training entry point
# One short epoch of fake data per backend (30 steps of batch 64, the first ones warm-up
# included in the epoch's images/s), eager; then triton compiled. Every run's output folder
# (metrics.jsonl) goes into the bundle; the step's time limit covers them all.
TRAIN_COMMON="--data fake --model rsir_tiny --batch-size 64 --amp bf16 --epochs 1 --steps-per-epoch 30 --val-items 64 --no-progress"
train_runs() {
  local b rc=0
  for b in ${TRAIN_BACKENDS:-triton cpp reference}; do
    echo "---- train --backend $b"
    # shellcheck disable=SC2086
    "$PY" -m rsir_kernels.train $TRAIN_COMMON --backend "$b" --output "$WORK/train_$b" ${TRAIN_ARGS:-} || rc=1
  done
  echo "---- train --backend triton --compile"
  # shellcheck disable=SC2086
  "$PY" -m rsir_kernels.train $TRAIN_COMMON --backend triton --compile --output "$WORK/train_triton_compile" \
    ${TRAIN_ARGS:-} || rc=1
  return $rc
}
if "$PY" -c "import rsir_kernels.train" 2>/dev/null; then
  export -f train_runs; export PY WORK TRAIN_COMMON
  run_step train 120 bash -c train_runs
else
  note_step train "rsir_kernels.train is not importable"
fi

# ---------------------------------------------------------------- 6b. the dense tasks' sizes
# shellcheck disable=SC2086
run_step bench_dense 90 "$PY" benchmarks/bench_dense.py --device cuda --dtype bfloat16 --out "$WORK/results" \
  ${BENCH_DENSE_ARGS:-}

# ---------------------------------------------------------------- device time against host time (optional)
if [ "${GPU_CHECK_BREAKDOWN:-0}" = 1 ]; then
  run_step breakdown 120 "$PY" -m benchmarks.tools.gpu_breakdown
fi

# ---------------------------------------------------------------- 7. the Triton launch configurations
run_step tune 60 "$PY" -m benchmarks.tools.tune_triton --stages 1,4

# ---------------------------------------------------------------- 8. compute-sanitizer
# The caching allocator would hide an out-of-bounds access inside a pooled block: off.
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -n 1)
for tool in memcheck racecheck; do
  for which in cpp triton; do
    name="sanitize_${tool}_${which}"
    file="tests/test_${which}.py"
    if [ -z "$SAN" ]; then note_step "$name" "compute-sanitizer not found"; continue; fi
    if [ ! -f "$file" ]; then note_step "$name" "$file does not exist yet"; continue; fi
    if [ "$tool" = racecheck ]; then
      # racecheck instruments every kernel and crawls (pytest of the GPU tests did not finish
      # in 75 s on an H200): our kernels only, on scripts/cuda_smoke.py's few shapes
      if [ "$which" = cpp ]; then filter=kns=rsir; else filter=kns=window_attn; fi
      run_step "$name" 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool racecheck --error-exitcode 99 \
        --kernel-name "$filter" "$PY" scripts/cuda_smoke.py "$which"
      continue
    fi
    if [ "$which" = cpp ]; then args=${SANITIZE_CPP:-"$file -k gpu -x -q"}; else args=${SANITIZE_TRITON:-"$file -k gpu --deselect $file::test_64bit_offsets -x -q"}; fi
    # shellcheck disable=SC2086
    run_step "$name" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 99 \
      "$PY" -m pytest $args
  done
done

# ---------------------------------------------------------------- summary and bundle
{
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit $COMMIT$DIRTY  total $(elapsed)s of ${BUDGET}s"
  echo
  printf '%-26s %-40s %s\n' step result seconds
  for s in "${STEPS[@]}"; do
    IFS='|' read -r n r t <<< "$s"
    printf '%-26s %-40s %s\n' "$n" "$r" "$t"
  done
  for f in backends bench_attn bench_model train bench_dense breakdown tune; do
    if [ -f "$WORK/$f.log" ]; then echo; echo "---- $f"; grep -v '^\s*\[' "$WORK/$f.log" | tail -n 60; fi
  done
  if [ -f "$WORK/tests.log" ]; then echo; echo "---- tests (tail)"; tail -n 25 "$WORK/tests.log"; fi
  for f in "$WORK"/sanitize_*.log; do
    [ -f "$f" ] && { echo; echo "---- $(basename "$f" .log) (tail)"; tail -n 8 "$f"; }
  done
} > "$SUMMARY"
cat "$SUMMARY"

tar -czf "$WORK.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null
cp "$WORK.tar.gz" "$OUTDIR/gpu_check.tar.gz"
cp "$SUMMARY" "$OUTDIR/summary.txt"
echo "$COMMIT$DIRTY" > "$OUTDIR/commit.txt"
for f in "$WORK"/results/bench_attn_*.json "$WORK"/results/bench_attn_*.png \
         "$WORK"/results/bench_model_*.json "$WORK"/results/dense_*.json "$WORK/junit.xml" "$WORK/tests.log" "$WORK/train.log"; do
  [ -f "$f" ] && cp "$f" "$OUTDIR/"
done
if [ "${GPU_CHECK_KEEP_ALL:-0}" = 1 ]; then mkdir -p "$OUTDIR/all" && cp -r "$WORK"/. "$OUTDIR/all/"; fi
rm -rf "$WORK" "$WORK.tar.gz"
echo "results in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"

failed=0
for s in "${STEPS[@]}"; do
  IFS='|' read -r n r t <<< "$s"
  case "$r" in "exit 0"|skipped*) ;; *) failed=1 ;; esac
done
exit $failed
