#!/usr/bin/env bash
# The GPU check in one command (issue 18): prepares the host as the tests do (scripts/setup_host.sh: the
# project's venv and ComfyUI, nothing else), then runs bench/gpu_check.py on the GPU. Extra arguments go
# to it (e.g. --modes "off;default" --frames 24). Table printed and written to bench/results/gpu_check-cuda.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
setup_out="$(bash "$REPO/scripts/setup_host.sh")"
VENV="$(printf '%s\n' "$setup_out" | sed -n 's/^VENV=//p')"
COMFYUI_PATH="$(printf '%s\n' "$setup_out" | sed -n 's/^COMFYUI_PATH=//p')"
export COMFYUI_PATH
exec "$VENV/bin/python" bench/gpu_check.py --device cuda "$@"
