#!/usr/bin/env bash
# The GPU checks, in one script, for a machine with a CUDA GPU (what issue 16 could not run without one):
#   tests      the whole suite with the GPU visible, device-dependent tests on it (--device cuda), notebooks left out
#   bench      scripts/bench_freeze.py (resnet50, 224 px, batch 128, 3 repeats): modes x levers, the package's loop
#              against the plain loop and fastai's stock loop, the input pipeline
#   compile    the same benchmark's torch.compile cells (unfrozen and frozen, bf16, channels_last), compile time
#              included in their warm-up column
#   practical  the main job (scripts/run_all.py), timed
# Usage: scripts/gpu_check.sh [tests] [bench] [compile] [practical]   (no argument: all four, in that order)
# Results go to $OUT (default runs/gpu_check): pytest.txt, bench_freeze/, bench_compile/, practical/, *.rc, times.
# Wheels the machine lacks: put them in .whl/ first (e.g. with ../shared/gpu/wheels.sh); they are installed into
# /tmp/site, and nothing else is changed on the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 - <<'PY' > "$OUT/device.txt" 2>&1 || { cat "$OUT/device.txt"; exit 4; }
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
PY
cat "$OUT/device.txt"

stage() {  # name, then the command; its output to $OUT/<name>.txt, exit status to $OUT/<name>.rc
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$rc" > "$OUT/$name.rc"
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/times.txt"
  tail -n 25 "$OUT/$name.txt"
}

workers=()
python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
for part in "${@:-tests bench compile practical}"; do
  for p in $part; do
    case $p in
      tests) stage pytest python3 -m pytest tests --device cuda --ignore=tests/test_notebooks.py -q -ra \
               -p no:cacheprovider "${workers[@]}" ;;
      bench) stage bench python3 scripts/bench_freeze.py --device cuda --repeats 3 --out "$OUT/bench_freeze" \
               --overwrite ;;
      compile) stage compile python3 scripts/bench_freeze.py --device cuda --repeats 3 --modes unfrozen,frozen \
                 --precisions bf16 --formats channels_last --cudnn-benchmark off --compile --no-overhead \
                 --no-pipeline --out "$OUT/bench_compile" --overwrite ;;
      practical) stage practical python3 scripts/run_all.py --device cuda --out "$OUT/practical" --overwrite ;;
      *) echo "unknown stage $p: use tests, bench, compile or practical" >&2; exit 2 ;;
    esac
  done
done
