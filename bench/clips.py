"""Real video clips for benchmarks: Debian's ``opencv-doc`` sample videos, found or installed.

``find_clip(name)`` looks in ``/usr/share/doc/opencv-doc/examples/data/`` and in the
repository's ``.cache/opencv-doc/`` (an unpacked copy); when the clip is in neither it runs
``apt-get install -y opencv-doc`` as root, or, if that is not possible (not root, or the
install left no file), ``apt-get download opencv-doc`` + ``dpkg-deb -x`` into ``.cache/``
(works without root). Gzipped copies (``NAME.gz``) are unpacked into ``.cache/``.

``load_clip(path, frames, size, start=0)`` -> ``torch.float32 [T, size, size, 3]`` in 0..1:
the first ``frames`` frames from ``start``, centre-cropped to a square and resized
(``cv2.INTER_AREA``), RGB.
"""
from __future__ import annotations

import gzip
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SYSTEM_DATA = pathlib.Path("/usr/share/doc/opencv-doc/examples/data")
CACHE = REPO_ROOT / ".cache" / "opencv-doc"
CACHE_DATA = CACHE / "usr/share/doc/opencv-doc/examples/data"


def _look(name: str) -> pathlib.Path | None:
    for folder in (SYSTEM_DATA, CACHE_DATA):
        plain = folder / name
        if plain.is_file():
            return plain
        packed = folder / (name + ".gz")
        if packed.is_file():
            target = CACHE / "unpacked" / name
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                with gzip.open(packed, "rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            return target
    return None


def _run(cmd: list[str]) -> bool:
    print(f"[clips] $ {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        return subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr).returncode == 0
    except FileNotFoundError:
        return False


def _install() -> None:
    if shutil.which("apt-get") is None:
        return
    if os.geteuid() == 0:
        env_ok = _run(["apt-get", "install", "-y", "--no-install-recommends", "opencv-doc"])
        if not env_ok:
            _run(["apt-get", "update"])
            _run(["apt-get", "install", "-y", "--no-install-recommends", "opencv-doc"])
        if SYSTEM_DATA.is_dir():
            return
    # Without root (or when the install kept no files): unpack the .deb into .cache/.
    with tempfile.TemporaryDirectory() as tmp:
        if subprocess.run(["apt-get", "download", "opencv-doc"], cwd=tmp, stdout=sys.stderr,
                          stderr=sys.stderr).returncode != 0:
            return
        debs = sorted(pathlib.Path(tmp).glob("opencv-doc_*.deb"))
        if debs:
            CACHE.mkdir(parents=True, exist_ok=True)
            _run(["dpkg-deb", "-x", str(debs[0]), str(CACHE)])


def find_clip(name: str = "vtest.avi") -> pathlib.Path:
    """Path of the opencv-doc sample video ``name``; installs/unpacks opencv-doc if needed."""
    found = _look(name)
    if found is None:
        print(f"[clips] {name} not found; fetching Debian's opencv-doc package (~96 MB)", file=sys.stderr)
        _install()
        found = _look(name)
    if found is None:
        raise SystemExit(
            f"Could not find or fetch {name}. Install Debian's opencv-doc package "
            f"(`sudo apt-get install opencv-doc`, it puts the clips in {SYSTEM_DATA}), or unpack it without root: "
            f"`apt-get download opencv-doc && dpkg-deb -x opencv-doc_*.deb {CACHE}`; or pass --clip PATH.")
    return found


def load_clip(path, frames: int, size: int, start: int = 0):
    """Read ``frames`` frames from ``start`` as ``torch.float32 [T, size, size, 3]`` RGB in 0..1."""
    import cv2
    import numpy as np
    import torch

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SystemExit(f"OpenCV cannot open {path}")
    out = []
    index = 0
    try:
        while len(out) < frames:
            ok, bgr = capture.read()
            if not ok:
                break
            if index >= start:
                h, w = bgr.shape[:2]
                side = min(h, w)
                top, left = (h - side) // 2, (w - side) // 2
                square = bgr[top:top + side, left:left + side]
                small = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
                out.append(cv2.cvtColor(small, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        capture.release()
    if len(out) < frames:
        raise SystemExit(f"{path} has only {len(out)} frames from frame {start}; asked for {frames}")
    return torch.from_numpy(np.stack(out).astype(np.float32) / 255.0)
