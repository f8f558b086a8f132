#!/usr/bin/env bash
# THE demo command:  bash scripts/demo.sh [--frames N] [--size S] [--out DIR] [--checkpoint PATH [--lora PATH]]
# Sets up the host like the tests (scripts/setup_host.sh), restyles a held-out real clip with the pack's own
# trained toy model (scripts/toy_model/) through the StreamV2V loop node with and without the feature
# bank, writes a side-by-side MP4 and prints (and saves) the metrics and what they show.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/host_env.sh"
exec "$VENV/bin/python" -P "$REPO/scripts/demo.py" "$@"
