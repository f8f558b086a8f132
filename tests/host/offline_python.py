"""A stand-in for the GPU machine's Python, for testing ``bench/gpu_check.sh`` where there is no GPU.

``offline_python(folder)`` makes a virtual environment (no pip, no system site-packages) whose site-packages
links only torch and what the GPU machine's image has that ComfyUI needs (``IMAGE``, with everything they
require), taken from this Python's environment; what the image lacks (``ABSENT``: torchsde, trampoline, av,
einops) must come from ``.gpu_bundle/``. Its ``sitecustomize`` refuses every network connection except to
this machine and notes each attempt; ``offline_env`` adds fake ``pip``/``apt-get``/``curl``/``wget`` commands
that note their use and fail, and ``unshare -n`` (a network namespace without interfaces) where it works.
"""
from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys

# What the GPU machine's image ships (DESIGN.md section 8: a PyTorch image with the common packages) that
# ComfyUI 0.3.75 and the pack import; their requirements come along.
IMAGE = ("torch", "numpy", "pillow", "scipy", "psutil", "safetensors", "pyyaml", "transformers", "aiohttp",
         "opencv-python-headless", "tqdm", "torchvision")
ABSENT = {"torchsde", "trampoline", "av", "einops"}
TOOLS = ("pip", "pip3", "apt-get", "apt", "curl", "wget")

SITECUSTOMIZE = '''
import os, socket

_log = os.environ.get("OFFLINE_LOG")
_local = ("127.0.0.1", "::1", "localhost", "0.0.0.0")


def _refuse(what):
    if _log:
        with open(_log, "a") as f:
            f.write(f"network: {what}\\n")
    raise OSError(f"network blocked (offline test): {what}")


def _check(address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in _local and not host.startswith("127."):
        _refuse(address)


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
socket.socket.connect = lambda self, address: (_check(address), _connect(self, address))[1]
socket.socket.connect_ex = lambda self, address: (_check(address), _connect_ex(self, address))[1]
socket.getaddrinfo = lambda host, *a, **k: (_check(host) if host else None, _getaddrinfo(host, *a, **k))[1]
'''


def _requirements(dist: importlib.metadata.Distribution) -> list[str]:
    names = []
    for requirement in dist.requires or []:
        if "extra ==" in requirement:
            continue
        marker = requirement.split(";", 1)[1] if ";" in requirement else ""
        if "sys_platform" in marker and sys.platform not in marker and "!=" not in marker:
            continue
        if "python_version" in marker and "<" in marker:  # back-ports for older Pythons
            continue
        names.append(re.split(r"[\s<>=!~\[;(]", requirement.strip(), maxsplit=1)[0])
    return names


def closure(names) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions ``names`` need, by normalised name (missing optional ones skipped)."""
    found, todo = {}, list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found or name in ABSENT:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[name] = dist
        todo += _requirements(dist)
    return found


def offline_python(folder: pathlib.Path) -> pathlib.Path:
    """The stand-in Python (see module doc); returns its executable."""
    venv = folder / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
                   check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    for dist in closure(IMAGE).values():
        tops = {pathlib.PurePath(str(f)).parts[0] for f in dist.files or []}
        for top in tops - {"..", "bin", "__pycache__"}:
            source = pathlib.Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return venv / "bin" / "python"


def offline_env(folder: pathlib.Path, log: pathlib.Path) -> tuple[dict, list[str]]:
    """(environment, command prefix) for a command that must not reach the network or install anything."""
    tools = folder / "tools"
    tools.mkdir(exist_ok=True)
    for tool in TOOLS:
        path = tools / tool
        path.write_text(f"#!/bin/sh\necho \"{tool} $*\" >> '{log}'\necho '{tool} is not allowed here' >&2\nexit 1\n")
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "COMFYUI"))}
    env.update(PATH=f"{tools}{os.pathsep}{env.get('PATH', '')}", OFFLINE_LOG=str(log), PIP_NO_INDEX="1",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", TMPDIR=str(folder))
    prefix = ["unshare", "-n"] if shutil.which("unshare") and _works(["unshare", "-n", "true"]) else []
    if not prefix and shutil.which("unshare") and _works(["unshare", "-rn", "true"]):
        prefix = ["unshare", "-rn"]
    return env, prefix


def _works(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0
