"""Test host: ComfyUI in-process (CPU), the pack as package ``streamv2v``, a real server fixture.

- ComfyUI is taken from $COMFYUI_PATH or <repo>/.comfyui (scripts/setup_host.sh provides it)
  and put on sys.path; ``comfy.cli_args.args.cpu = True`` is set before anything imports
  ``comfy.model_management``.
- The pack (the repository root, which is a package) is loaded once as ``streamv2v``:
  ``from streamv2v.streamv2v_core import bank``, ``from streamv2v.nodes import ...``.
  The repository root itself is never put on sys.path (that would create a second copy of
  ``streamv2v_core`` with its own state, and its ``nodes/`` would shadow ComfyUI's nodes.py).
- Test helpers: ``from host import tiny_models``, ``from host.server import ComfyServer``.
- Fixture ``comfy_server`` (session): a headless ComfyUI with the pack and the test nodes.
"""
import importlib.util
import os
import pathlib
import sys

import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
COMFY_PATH = pathlib.Path(os.environ.get("COMFYUI_PATH") or (REPO_ROOT / ".comfyui")).resolve()
PACK_NAME = "streamv2v"

# --- sys.path: drop the repo root (python -m pytest / rootdir insertion), add tests/ and ComfyUI.
_repo_real = os.path.realpath(REPO_ROOT)
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _repo_real]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
if not (COMFY_PATH / "comfy" / "model_management.py").exists():
    raise pytest.UsageError(f"ComfyUI not found at {COMFY_PATH}: run `bash scripts/setup_host.sh` "
                            "or set COMFYUI_PATH")
if str(COMFY_PATH) not in sys.path:
    sys.path.insert(0, str(COMFY_PATH))

if "comfy.model_management" in sys.modules:
    raise RuntimeError("comfy.model_management was imported before tests/conftest.py set --cpu")

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
comfy.cli_args.args.disable_auto_launch = True

import torch  # noqa: E402

torch.set_num_threads(max(1, min(os.cpu_count() or 2, 8)))

import comfy.model_management  # noqa: E402,F401  (now bound to the CPU)
import comfy.utils  # noqa: E402

comfy.utils.PROGRESS_BAR_ENABLED = False  # keep test logs readable


def _load_pack():
    init = REPO_ROOT / "__init__.py"
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    if not init.exists():
        return None  # pack not written yet: host tests still run
    spec = importlib.util.spec_from_file_location(PACK_NAME, init, submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module


PACK = _load_pack()


@pytest.fixture(scope="session")
def pack():
    """The pack module (``streamv2v``); skips when the pack has no __init__.py yet."""
    if PACK is None:
        pytest.skip("pack __init__.py not present")
    return PACK


@pytest.fixture(scope="session")
def comfy_server():
    """A headless ComfyUI (--cpu) with custom nodes ``streamv2v`` (the repo) and the test nodes."""
    from host.server import ComfyServer

    with ComfyServer(comfy_path=COMFY_PATH) as srv:
        yield srv
