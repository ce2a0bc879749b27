#!/usr/bin/env bash
# The whole GPU validation in one command, for a lent H100/H200 (16 cores, no network), in at most
# 9 minutes of wall time:
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR   # the same steps on a CPU, tiny shapes (CI)
#
# Steps, in order (caps below): build the extension in place (FORCE_CUDA=1, sm_90, 16 jobs, no
# network); armnet_ops.info; the needs_cuda tests but Triton's; the Triton tests on the GPU;
# compute-sanitizer memcheck and racecheck over benchmarks/sanitizer_cases.py (one small case of
# every CUDA kernel, fwd+bwd, fp32 and bf16; no Triton, no torch.compile); benchmarks/ops.py in
# bf16/fp16/fp32; benchmarks/fps.py for armnet_r50 512² batch 1 bf16 with kernels and reference,
# and again with channels_last and CUDA graphs.
#
# Every step runs under `timeout` with its own cap and never stops the steps after it. OUT_DIR
# gets at most 6 files, no sub-folders: gpu_check.log (every step's output, one section each),
# steps.tsv (step, exit code, seconds, cap, log lines), ops.json, fps.json, fps_graphs.json and
# summary.json. The summary table (benchmarks/gpu_check_summary.py) is printed last; the exit
# code is 0 only when no step failed or timed out.
#
# The dry run: Triton under TRITON_INTERPRET=1 on a few tests, the needs_cuda tests collected and
# skipped, no sanitizer (SKIP), ops.py --smoke on the CPU, fps.py with armnet_tiny at 64² (no CUDA
# graphs); the build compiles nothing when the extension is already built (setup.py is only
# configured as on the GPU), else builds it as the environment says.
#
# For tests of this script: GPU_CHECK_STEPS=build,info runs only those steps (the others are
# SKIP); GPU_CHECK_FAIL=step and GPU_CHECK_HANG=step replace a step's command with a failing or a
# hanging one; GPU_CHECK_CAPS="step=seconds ..." overrides caps.
set -uo pipefail  # no -e: a failing step must not stop the steps after it

usage() { echo "usage: bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR" >&2; exit 2; }
DRY=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    -*) usage ;;
    *) [[ -z "$OUT" ]] || usage; OUT=$arg ;;
  esac
done
[[ -n "$OUT" ]] || usage
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2

# ---- the step list and the per-step caps (seconds), the one place they are set --------------
# GPU caps sum to 535 s, under the 9 minutes (540 s) of the loan's wall-clock budget. The build
# runs its 7 units in parallel, so it takes about its slowest unit: carafe.cu, about 100 s of CPU
# on one core of a 2-core CI machine, plus the link. The dry-run caps are for a busy 2-core CPU.
STEPS=(build info tests_cuda tests_triton memcheck racecheck ops fps fps_graphs)
declare -A CAP=([build]=150 [info]=15 [tests_cuda]=70 [tests_triton]=70 [memcheck]=40
                [racecheck]=45 [ops]=75 [fps]=40 [fps_graphs]=30)
declare -A DRY_CAP=([build]=240 [info]=120 [tests_cuda]=180 [tests_triton]=240 [memcheck]=10
                    [racecheck]=10 [ops]=180 [fps]=180 [fps_graphs]=180)
BUDGET=540  # seconds for all steps together: a step never gets more than what is left of it
if (( DRY )); then
  for s in "${STEPS[@]}"; do CAP[$s]=${DRY_CAP[$s]}; done
  BUDGET=1500
fi
for kv in ${GPU_CHECK_CAPS:-}; do CAP[${kv%%=*}]=${kv#*=}; done

export PY=${PYTHON:-python3} OUT DRY
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$( ((DRY)) && echo 2 || echo 16)}
# The test steps' conftest sets TRITON_INTERPRET=1 itself when no GPU is visible; the benchmarks
# of the dry run leave the Triton interpreter out (it would take minutes for a timing).
unset TRITON_INTERPRET
if (( DRY )); then export CUDA_VISIBLE_DEVICES=""; fi
LOG=$OUT/gpu_check.log
TSV=$OUT/steps.tsv
: > "$LOG"
printf 'step\trc\tseconds\tcap\tfirst_line\tlast_line\n' > "$TSV"

# ---- the steps: each runs in its own bash under timeout, so they are exported functions -----

step_build() {
  if (( DRY )); then
    # No compiling when the extension is there: a full build would not fit the dry run's time (a
    # `pip install -e .` builds in a temporary folder, so nothing is incremental after it). The
    # GPU run's configuration is still exercised: setup.py with the same variables, asked only
    # for the package name, finds the toolkit and declares the CUDA extension.
    if "$PY" -W ignore -c "import sys, armnet_ops._backend as b; sys.exit(b.EXTENSION_ERROR is not None)"; then
      echo "dry run: armnet_ops._C is built; setup.py configured as on the GPU, nothing compiled"
      FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" setup.py --name
    else
      echo "dry run: armnet_ops._C is not built; building it (FORCE_CUDA=${FORCE_CUDA:-unset})"
      MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace
    fi
    return
  fi
  # A stale extension (built here for another torch, or by an earlier run) must not be tested
  # when this build fails: remove it first. build_ext --inplace installs nothing, so the torch in
  # the machine's own environment is left as it is.
  rm -f armnet_ops/_C*.so
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" setup.py build_ext --inplace
}

step_info() {
  "$PY" -m armnet_ops.info || return
  (( DRY )) || nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
}

pytest_args() {
  local args=(-q -p no:cacheprovider -rfE)
  # pytest-xdist spreads Triton's compilation over the cores; one GPU serves all workers.
  if (( ! DRY )) && "$PY" -c "import xdist" 2>/dev/null; then args+=(-n 8); fi
  echo "${args[@]}"
}

step_tests_cuda() {
  # shellcheck disable=SC2046
  "$PY" -m pytest tests $(pytest_args) -m needs_cuda -k "not triton"
}

step_tests_triton() {
  if (( DRY )); then
    # The interpreter is slow: one small test per op family.
    # shellcheck disable=SC2046
    "$PY" -m pytest tests/test_cca.py tests/test_carafe.py tests/test_directional_conv.py \
      $(pytest_args) -m "not slow" -k "triton-interpreter and (test_lse_saved or test_grad_out_with_odd_storage_offset or (test_edge_shapes and not carafe))"
    return
  fi
  # shellcheck disable=SC2046
  "$PY" -m pytest tests $(pytest_args) -m needs_cuda -k triton
}

sanitize() {
  # Explicit backend="cuda" in the driver keeps Triton out; TORCHDYNAMO_DISABLE keeps torch.compile
  # out; without the caching allocator every tensor is its own allocation, so an access past a
  # tensor's end is outside any allocation and memcheck sees it. Only armnet_ops' kernels are
  # instrumented (ATen's and cuDNN's are not ours to check, and slow under the tool).
  TORCHDYNAMO_DISABLE=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool "$1" --kernel-name kns=armnet_ops --error-exitcode 7 \
      --report-api-errors no --print-limit 20 \
      "$PY" benchmarks/sanitizer_cases.py --dtype bf16
}
step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck; }

step_ops() {
  if (( DRY )); then
    "$PY" benchmarks/ops.py --smoke --device cpu --json "$OUT/ops.json"
  else
    "$PY" benchmarks/ops.py --op cca --dtype bf16 --dtype fp16 --dtype fp32 --json "$OUT/ops.json"
  fi
}

step_fps() {
  if (( DRY )); then
    "$PY" benchmarks/fps.py --model armnet_tiny --resolution 64 64 --batch 1 --dtype fp32 \
      --device cpu --ops-backend both --warmup 1 --iters 1 --json "$OUT/fps.json"
  else
    "$PY" benchmarks/fps.py --model armnet_r50 --resolution 512 512 --batch 1 --dtype bf16 \
      --ops-backend both --json "$OUT/fps.json"
  fi
}

step_fps_graphs() {
  if (( DRY )); then  # CUDA graphs need a GPU: channels_last alone
    "$PY" benchmarks/fps.py --model armnet_tiny --resolution 64 64 --batch 1 --dtype fp32 \
      --device cpu --ops-backend both --channels-last --warmup 1 --iters 1 --json "$OUT/fps_graphs.json"
  else
    "$PY" benchmarks/fps.py --model armnet_r50 --resolution 512 512 --batch 1 --dtype bf16 \
      --ops-backend both --channels-last --cuda-graphs --json "$OUT/fps_graphs.json"
  fi
}

export -f pytest_args sanitize "${STEPS[@]/#/step_}"

in_list() { [[ ",$2," == *",$1,"* ]]; }

# ---- the runner ----------------------------------------------------------------------------
T0=$SECONDS
echo "[gpu_check] $( ((DRY)) && echo "dry run" || echo "GPU run") into $OUT, $(date -u +%FT%TZ)"
for s in "${STEPS[@]}"; do
  first=$(( $(wc -l < "$LOG") + 1 ))
  echo "===== $s =====" >> "$LOG"
  skip=""
  if [[ -n "${GPU_CHECK_STEPS:-}" ]] && ! in_list "$s" "$GPU_CHECK_STEPS"; then
    skip="not selected (GPU_CHECK_STEPS)"
  elif (( DRY )) && [[ $s == memcheck || $s == racecheck ]]; then
    skip="dry run: no GPU, no compute-sanitizer"
  fi
  if [[ -n "$skip" ]]; then
    echo "SKIP: $skip" >> "$LOG"
    printf '%s\tskip\t0\t%s\t%s\t%s\n' "$s" "${CAP[$s]}" "$first" "$(wc -l < "$LOG")" >> "$TSV"
    continue
  fi
  cmd="step_$s"
  if in_list "$s" "${GPU_CHECK_FAIL:-}"; then cmd="echo 'injected failure (GPU_CHECK_FAIL)'; exit 1"; fi
  if in_list "$s" "${GPU_CHECK_HANG:-}"; then cmd="echo 'injected hang (GPU_CHECK_HANG)'; sleep 100000"; fi
  cap=${CAP[$s]}
  left=$(( BUDGET - (SECONDS - T0) ))
  (( cap > left )) && cap=$(( left > 1 ? left : 1 ))
  t=$SECONDS
  # timeout signals its whole process group (pytest workers, the sanitizer's target too); KILL
  # follows 10 s after TERM.
  timeout --kill-after=10 "$cap" bash -c "$cmd" >> "$LOG" 2>&1 < /dev/null
  rc=$?
  dt=$(( SECONDS - t ))
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$rc" "$dt" "$cap" "$first" "$(wc -l < "$LOG")" >> "$TSV"
  echo "[gpu_check] $s: exit $rc after $dt s (cap $cap s)"
  if (( rc != 0 )); then  # the end of a failing step's output, for whoever reads only stdout
    tail -n 15 "$LOG" | sed 's/^/    | /'
  fi
done
echo "[gpu_check] all steps: $(( SECONDS - T0 )) s"
"$PY" benchmarks/gpu_check_summary.py "$OUT" $( ((DRY)) && echo --dry-run)
