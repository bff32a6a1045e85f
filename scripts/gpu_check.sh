#!/usr/bin/env bash
# Usage: scripts/gpu_check.sh [--dry-run] RESULTS_DIR
#   (fastai and its pure-Python needs from .whl/: run scripts/gpu_wheels.sh first and carry .whl to the GPU machine)
#
# The GPU checks in one command of at most 9 minutes on a bare GPU machine, most valuable first, each stage under its
# own time limit (seconds in brackets; "rest" takes what remains of the 9 minutes, and stops there):
#   install    fastai and its needs from .whl/ into /tmp/site when fastai cannot be imported                [45]
#   device     the GPU is there (name, CUDA version)                                                        [30]
#   pipeline   real JPEGs through each input pipeline (pil, device, cached): loader alone, package Learner
#              unfrozen and frozen (train_bn=False), ResNet50 224 px batch 128 AMP channels_last, against the
#              synthetic baseline of the same run; host reads and blocking copies per step                   [200]
#   syncdebug  one training epoch per pipeline under torch.cuda.set_sync_debug_mode("error")                 [75]
#   tests      the pipeline tests on the GPU (--device cuda: nvJPEG and the decoded cache on the device)     [90]
#   bench      the package's defaults (bf16 channels_last) per training mode against fp32, and the package's
#              loop against the plain one (scripts/bench_freeze.py, its pipeline section left to `pipeline`) [75]
#   rest       the rest of the suite on the GPU (no notebooks: there is no Jupyter kernel)                   [rest]
# Results, in RESULTS_DIR itself (8 files): summary.md (stages, exit codes, seconds, the goals' figures),
# pipeline.md, pipeline.json, syncdebug.txt, tests.txt, bench.md, rest.txt, log.txt (everything printed).
# --dry-run: the same stages and files on the CPU at tiny sizes, installing nothing (the suite runs it).
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
  sed -n '2,3p' "$0" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
RES=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
BUDGET=520  # seconds for the stages: 9 minutes less the 10 s a stage may take to stop and the summary
T_INSTALL=45 T_DEVICE=30 T_PIPELINE=200 T_SYNC=75 T_TESTS=90 T_BENCH=75
START=$SECONDS
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
LOG=$RES/log.txt
SUMMARY=$RES/summary.md
: > "$LOG"
if [ $DRY = 1 ]; then
  MODE="dry run (CPU, tiny sizes)"; DEVICE=cpu; FLAG=(--dry-run); CACHE=$(mktemp -d)
  TESTS=(tests/test_pipeline.py -k counter_sees)
  BENCH=(--quick --size 32 --bs 4 --steps 1 --repeats 2 --warmup 1 --modes frozen --overhead-modes frozen
         --threads 1 --precisions fp32 --formats contiguous)
  REST=(tests/test_layout.py)
else
  MODE="GPU"; DEVICE=cuda; FLAG=(); CACHE=/tmp/tp3_gpu_check_cache
  TESTS=(tests/test_pipeline.py)
  BENCH=(--modes unfrozen,frozen_bn,frozen,precomputed --precisions bf16 --formats channels_last --repeats 3
         --overhead-modes unfrozen,frozen)
  REST=(tests --ignore=tests/test_pipeline.py --ignore=tests/test_notebooks.py --ignore=tests/test_gpu_check.py)
fi
{
  echo "# GPU check: $MODE"
  echo
  echo "- command: \`scripts/gpu_check.sh $([ $DRY = 1 ] && echo '--dry-run ')RESULTS_DIR\`, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "| stage | exit code | seconds | limit s |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

FAILED=()
stage() {  # name, time limit (s), output file (or -), command...: runs it under `timeout`, logs, adds a summary row
  local name=$1 limit=$2 out=$3; shift 3
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  if [ "$limit" -le 5 ]; then
    echo "| $name | not run: out of time | 0 | 0 |" >> "$SUMMARY"
    echo "== $name: not run, out of time" >> "$LOG"
    FAILED+=("$name")
    return 0
  fi
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s): $*" >> "$LOG"
  if [ "$out" = "-" ]; then
    timeout --signal=INT --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1; rc=$?
  else
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$out" 2>&1; rc=$?
    cat "$out" >> "$LOG"
  fi
  echo "| $name | $rc$([ $rc = 124 ] && echo ' (time limit)') | $((SECONDS - t0)) | $limit |" >> "$SUMMARY"
  # the rest runs while time remains: its time limit is the end of the check, not a failure
  [ $rc = 0 ] || { [ "$name" = rest ] && [ $rc = 124 ]; } || FAILED+=("$name")
  echo "== $name: exit code $rc after $((SECONDS - t0))s" >> "$LOG"
  return $rc
}

install() {
  if python3 -c "import fastai, fastprogress, mlxtend" 2>/dev/null; then
    echo "fastai is there: nothing to install"
  elif compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || return 3
  else
    echo "fastai is missing and .whl/ holds no wheels: run scripts/gpu_wheels.sh where a package registry is reachable and carry .whl" >&2
    return 3
  fi
}

device() {  # the GPU and the versions (pipeline.md repeats them); fails at once without a GPU
  python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible"
print(torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
PY
}

export -f install device
if [ $DRY = 0 ]; then
  export PYTHONPATH=/tmp/site:$PYTHONPATH
  stage install "$T_INSTALL" - bash -c install || { echo "install failed: see $LOG" >&2; cat "$SUMMARY"; exit 3; }
  stage device "$T_DEVICE" - bash -c device || { echo "no usable GPU: see $LOG" >&2; cat "$SUMMARY"; exit 4; }
fi
stage pipeline "$T_PIPELINE" - python3 scripts/pipeline_check.py pipeline "$RES/pipeline" "${FLAG[@]}" \
  --cache-dir "$CACHE"
stage syncdebug "$T_SYNC" - python3 scripts/pipeline_check.py syncdebug "$RES/syncdebug.txt" "${FLAG[@]}" \
  --cache-dir "$CACHE"
stage tests "$T_TESTS" "$RES/tests.txt" python3 -m pytest -q -ra -p no:cacheprovider --device "$DEVICE" "${TESTS[@]}"
stage bench "$T_BENCH" - python3 scripts/bench_freeze.py --device "$DEVICE" "${BENCH[@]}" --cudnn-benchmark off \
  --no-pipeline --out "$CACHE/bench" --overwrite --cache-dir "$CACHE"
cp "$CACHE/bench/bench.md" "$RES/bench.md" 2>/dev/null
stage rest "$BUDGET" "$RES/rest.txt" python3 -m pytest -q -ra -p no:cacheprovider --device "$DEVICE" "${REST[@]}"
for f in pipeline.md pipeline.json syncdebug.txt tests.txt bench.md rest.txt; do
  [ -e "$RES/$f" ] || echo "(stage did not write this file: see log.txt)" > "$RES/$f"
done
{
  echo
  echo "Total: $((SECONDS - START)) s of $BUDGET."
  echo
  echo "## The goals' figures (pipeline.md has every row)"
  echo
  echo "| pipeline | what | images/s | of synthetic | host reads/step | blocking copies/step |"
  echo "|---|---|---|---|---|---|"
  grep -E '^\| (synthetic|pil|device|cached|auto) \|' "$LOG" | grep -v ' step ms ' | head -n 30
  echo
  echo "## Sync-debug epochs"
  echo
  sed 's/^/    /' "$RES/syncdebug.txt"
  echo
  echo "## Tests"
  echo
  echo "    tests: $(tail -n 1 "$RES/tests.txt")"
  echo "    rest: $(tail -n 1 "$RES/rest.txt")"
} >> "$SUMMARY"
[ $DRY = 1 ] && rm -rf "$CACHE"
cat "$SUMMARY"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "stages that failed: ${FAILED[*]}" >&2
  exit 1
fi
