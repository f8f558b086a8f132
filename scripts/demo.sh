#!/usr/bin/env bash
# THE demo command:  bash scripts/demo.sh [--frames N] [--size S] [--out DIR]
# Sets up the host like the tests (scripts/setup_host.sh), generates a clip, restyles it with a
# random-weight SD1.5-shaped model through the StreamV2V loop node with and without the feature
# bank, writes both MP4s and prints (and saves) the temporal-consistency metrics.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
setup_out="$(bash "$REPO/scripts/setup_host.sh")"
VENV="$(printf '%s\n' "$setup_out" | sed -n 's/^VENV=//p')"
COMFYUI_PATH="$(printf '%s\n' "$setup_out" | sed -n 's/^COMFYUI_PATH=//p')"
export COMFYUI_PATH
exec "$VENV/bin/python" -P "$REPO/scripts/demo.py" "$@"
