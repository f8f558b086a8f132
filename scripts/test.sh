#!/usr/bin/env bash
# THE test command:  bash scripts/test.sh [pytest args...]
# Prepares the host (venv + ComfyUI, see scripts/setup_host.sh; fast when already done),
# then runs pytest on tests/ with the venv's Python. Extra arguments go to pytest.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

source "$REPO/scripts/host_env.sh"
export STREAMV2V_VENV="$VENV"

# -P: do not put the current directory (the repo root) on sys.path; tests/conftest.py loads
# the pack as the package `streamv2v` instead.
# Without a path among the arguments, run tests/ (never the whole tree: .comfyui has tests too).
have_path=0
for a in "$@"; do
    [[ "$a" != -* && -e "${a%%::*}" ]] && have_path=1
done
if [[ $have_path -eq 0 ]]; then
    set -- tests "$@"
fi
exec "$VENV/bin/python" -P -m pytest -p no:cacheprovider "$@"
