#!/usr/bin/env bash
# The GPU check in one command (issue 18): prepares the host as the tests do (scripts/setup_host.sh: the
# project's venv and ComfyUI, nothing else), then runs bench/gpu_check.py on the GPU. Extra arguments go
# to it (e.g. --modes "off;default" --frames 24). Table printed and written to bench/results/gpu_check-cuda.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
source "$REPO/scripts/host_env.sh"
exec "$VENV/bin/python" bench/gpu_check.py --device cuda "$@"
