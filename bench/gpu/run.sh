#!/usr/bin/env bash
# The GPU check, device half: one command on an H100/H200 host (Python 3.12 with torch, no TVM).
# Needs .gpu/ from bench/gpu/prepare.py; writes tables to stdout and JSON to $OUT (or ./gpu-out).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pgen-site .gpu/wheels/*.whl
# Packages and bundles after the first carry no runtime libraries (see prepare.py): give them
# the first one's.
first=""
for b in .gpu/packages/*/ .gpu/bundles/*/ .gpu/models/*/; do
  if [ -d "$b/lib" ]; then first="${first:-$b}"; fi
done
for b in .gpu/packages/*/ .gpu/bundles/*/ .gpu/models/*/; do
  if [ -d "$b" ] && [ ! -d "$b/lib" ] && [ -n "$first" ]; then cp -r "$first/lib" "$b/lib"; fi
done
export PYTHONPATH="/tmp/pgen-site:$PWD/.gpu/runtime" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 bench/gpu/check.py --gpu-dir .gpu --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
