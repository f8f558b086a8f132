# Sourced (not run) by the command scripts (test.sh, demo.sh, bench/gpu_bundle.sh): prepares the host with
# scripts/setup_host.sh and sets VENV and COMFYUI_PATH (exported) from what it prints.
setup_out="$(bash "$(dirname "${BASH_SOURCE[0]}")/setup_host.sh")"
VENV="$(printf '%s\n' "$setup_out" | sed -n 's/^VENV=//p')"
COMFYUI_PATH="$(printf '%s\n' "$setup_out" | sed -n 's/^COMFYUI_PATH=//p')"
export COMFYUI_PATH
