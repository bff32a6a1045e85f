#!/usr/bin/env bash
# Usage: scripts/gpu_wheels.sh [NAME==VERSION ...]
# Where a package registry can be reached: put into .whl/ (git-ignored) the wheels that a bare GPU machine lacks,
# for scripts/gpu_check.sh to install there when fastai cannot be imported: fastai and its pure-Python needs, and
# mlxtend, for CPython $PYVER (default 3.12) on x86_64 Linux. torch, torchvision, timm and the rest of setup.cfg
# are expected on that machine; name more packages as arguments. fastprogress stays below 1.1 (setup.cfg says why).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "fastai==2.8.12" "fastcore>=2.2.22" "fastdownload>=0.0.8,<2" "fasttransform>=0.0.3" "fastprogress==1.0.3" \
  "plum-dispatch<2.10" "beartype>=0.16.2" mlxtend "$@"
ls .whl
