#!/usr/bin/env bash
# The prepared GPU check (bench/device_check.py): correctness, precision, throughput and
# the sharded train step, in one run under 8 minutes; smoke sizes where JAX finds no GPU.
#
#   bash bench/device_check.sh [OUT_DIR]          # default OUT_DIR: runs/device_check
#
# Optional, from the repository root (both are git-ignored, and travel with the tree):
#   .whl/*.whl        wheels to install first (faiss-cpu for CPython 3.12: the IVF
#                     search check and the re-ranking timing need faiss), e.g.
#                     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                       --implementation cp --platform manylinux_2_28_x86_64 -d .whl faiss-cpu==1.15.1
#   .ref/qinco_v1/    a copy of the PyTorch reference's qinco_v1 folder: timed as well (ratios)
# Environment: PYTHON (default .venv/bin/python if present, else python3), REFERENCE_DIR (default .ref/qinco_v1 if present),
# DEVICE_CHECK_ARGS (extra flags for the driver, e.g. "--budget_s 300").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/device_check}"
# the project's .venv (make install) when there is one, else the system python3 (the GPU machines)
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" > /dev/null && ! "$PYTHON" -c "import faiss" 2>/dev/null; then
    SITE="${DEVICE_CHECK_SITE:-/tmp/qinco_device_site}"
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

REFERENCE_DIR="${REFERENCE_DIR:-}"
if [ -z "$REFERENCE_DIR" ] && [ -f .ref/qinco_v1/model_qinco.py ]; then
    REFERENCE_DIR=.ref/qinco_v1
fi
# JAX takes 75 % of the GPU's memory by default: leave room for the torch reference.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > "$OUT/nvidia_smi.csv" 2>/dev/null || true
rm -f "$OUT/summary.txt"
rc=0
# shellcheck disable=SC2086  # DEVICE_CHECK_ARGS is a list of flags
"$PYTHON" bench/device_check.py --out "$OUT" ${REFERENCE_DIR:+--reference_dir "$REFERENCE_DIR"} \
    ${DEVICE_CHECK_ARGS:-} || rc=$?
if [ ! -f "$OUT/summary.txt" ]; then  # the driver died (a crash in a native library?)
    echo "device_check.py exited with status $rc before its summary; the sections written so far:"
    cat "$OUT/device_check.json" 2>/dev/null || echo "(no device_check.json)"
fi
exit "$rc"
