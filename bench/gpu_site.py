"""The GPU check's set-up from ``.gpu_bundle/`` (``bench/gpu_bundle.sh``), standard library only, no network.

``python bench/gpu_site.py BUNDLE WORK`` unpacks ComfyUI's tree into WORK (once per bundle), unpacks each
bundled wheel whose module this Python lacks (pure-Python wheels, and binary ones made for this Python), and
prints ``COMFYUI_PATH=...`` and ``PYTHONPATH=...`` for ``bench/gpu_check.sh``. Nothing is installed anywhere
else, nothing is downloaded. Exit status 3, with a line naming each, when a module the check needs is
neither here nor bundled (the GPU machine's image is expected to have PyTorch, numpy, Pillow, SciPy and the
other packages PyTorch images carry; ``REQUIRED`` lists them).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import platform
import sys
import tarfile
import zipfile

# module -> the distribution to install where it is missing. What ComfyUI 0.3.75 (comfy.*, nodes.py,
# comfy_api.latest) and the pack import when the check loads them in-process.
REQUIRED = {
    "torch": "torch (a CUDA build)", "numpy": "numpy", "PIL": "pillow", "scipy": "scipy", "psutil": "psutil",
    "safetensors": "safetensors", "yaml": "pyyaml", "einops": "einops", "tqdm": "tqdm", "torchsde": "torchsde",
    "av": "av", "transformers": "transformers", "tokenizers": "tokenizers", "aiohttp": "aiohttp", "yarl": "yarl",
    "cv2": "opencv-python-headless", "torchvision": "torchvision",
}


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def unpack_comfyui(bundle: pathlib.Path, work: pathlib.Path) -> pathlib.Path:
    """ComfyUI's tree from the bundle, unpacked once per bundle (a marker file says it is complete)."""
    archive = bundle / "comfyui.tar.gz"
    target = work / f"comfyui-{digest(archive)}"
    if not (target / ".unpacked").exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if safe_member(m.name)]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(target, members=members, **safe)
        (target / ".unpacked").write_text("ok\n")
    return target


def safe_member(name: str) -> bool:
    path = pathlib.PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


def wheel_fits(name: str) -> bool:
    """Whether a wheel (by its file name's tags) runs on this Python: pure, or CPython for this version/ABI
    (``abi3`` from its version on) on this machine."""
    python, abi, plat = name[:-len(".whl")].split("-")[-3:]
    if plat == "any":
        return python.startswith("py3") or python == f"cp{sys.version_info[0]}{sys.version_info[1]}"
    if platform.python_implementation() != "CPython" or platform.machine() not in plat or "linux" not in plat \
            or not sys.platform.startswith("linux"):
        return False
    wanted = (int(python[2]), int(python[3:]))
    return sys.version_info[:2] >= wanted if abi == "abi3" else sys.version_info[:2] == wanted


def manifest(bundle: pathlib.Path) -> list[tuple[str, str]]:
    """(module, wheel file) of every bundled wheel."""
    lines = (bundle / "manifest.txt").read_text().splitlines()
    return [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#")]


def unpack_wheels(bundle: pathlib.Path, work: pathlib.Path) -> pathlib.Path | None:
    """Unpack the bundled wheels whose module is missing here into one folder; returns it (None: none)."""
    needed = []
    for module, wheel in manifest(bundle):
        if importlib.util.find_spec(module) is not None:
            continue
        if not wheel_fits(wheel):
            print(f"[gpu_check] the bundled {wheel} does not fit this Python ({platform.python_version()}, "
                  f"{platform.machine()}): not used", file=sys.stderr)
            continue
        needed.append(wheel)
    if not needed:
        return None
    site = work / f"site-{hashlib.sha256(' '.join(sorted(needed)).encode()).hexdigest()[:12]}"
    if not (site / ".unpacked").exists():
        site.mkdir(parents=True, exist_ok=True)
        for wheel in needed:
            with zipfile.ZipFile(bundle / "wheels" / wheel) as archive:
                archive.extractall(site, members=[n for n in archive.namelist() if safe_member(n)])
        (site / ".unpacked").write_text("ok\n")
    print(f"[gpu_check] from the bundle: {', '.join(needed)}", file=sys.stderr)
    return site


def missing(site: pathlib.Path | None, bundled: list[str]) -> list[str]:
    """Required modules (``REQUIRED`` and every bundled one: the pack's own requirements) found neither on
    this Python's path nor in ``site``."""
    if site is not None:
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    return [module for module in dict.fromkeys([*REQUIRED, *bundled]) if importlib.util.find_spec(module) is None]


def main() -> int:
    bundle, work = (pathlib.Path(a).resolve() for a in sys.argv[1:3])
    if not (bundle / "manifest.txt").exists() or not (bundle / "comfyui.tar.gz").exists():
        print(f"[gpu_check] no bundle at {bundle}: run `bash bench/gpu_bundle.sh` where PyPI answers, and bring "
              f".gpu_bundle/ along with the repository", file=sys.stderr)
        return 3
    comfy = unpack_comfyui(bundle, work)
    site = unpack_wheels(bundle, work)
    absent = missing(site, [module for module, _ in manifest(bundle)])
    if absent:
        print(f"[gpu_check] this Python ({sys.executable}) lacks what the check needs and the bundle does not "
              f"hold: {', '.join(f'{m} (install {REQUIRED.get(m, m)})' for m in absent)}", file=sys.stderr)
        return 3
    path = os.pathsep.join([str(site)] * (site is not None) + [p for p in [os.environ.get("PYTHONPATH")] if p])
    print(f"COMFYUI_PATH={comfy}")
    print(f"PYTHONPATH={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
