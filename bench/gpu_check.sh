#!/usr/bin/env bash
# The GPU check in one command (issue 30), on a GPU machine without network:
#
#   bash bench/gpu_bundle.sh                 # here, where PyPI answers: prepares .gpu_bundle/ (about 42 MiB)
#   PYTHON=python3 bash bench/gpu_check.sh   # there: a Python with a CUDA torch; the repository + .gpu_bundle/
#
# Uses only the repository, .gpu_bundle/ and $PYTHON: never pip, apt or a download, no root. ComfyUI's tree
# and the wheels the Python lacks are unpacked under $GPU_CHECK_WORK (default: $TMPDIR/streamv2v-gpu-check).
# Then bench/gpu_check.py runs its rows (extra arguments go to it); the table is printed and written to
# bench/results/gpu_check-cuda.md. Exit status: 0 done, 2 no CUDA device, 3 set-up incomplete (says what).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
BUNDLE="${GPU_BUNDLE:-$REPO/.gpu_bundle}"
WORK="${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/streamv2v-gpu-check}"

env_lines="$("$PY" bench/gpu_site.py "$BUNDLE" "$WORK")" || exit $?
COMFYUI_PATH="$(printf '%s\n' "$env_lines" | sed -n 's/^COMFYUI_PATH=//p')"
PYTHONPATH="$(printf '%s\n' "$env_lines" | sed -n 's/^PYTHONPATH=//p')"
export COMFYUI_PATH PYTHONPATH
exec "$PY" bench/gpu_check.py "$@"
