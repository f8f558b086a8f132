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
- Fixture ``frontend_server`` (parametrized): ``comfy_server`` (the frontend 0.3.75 pins) and a second server
  serving the newest ``comfyui-frontend-package`` (``NEWEST_FRONTEND``, installed into .cache by
  scripts/setup_host.sh; skipped without it), for the browser tests that matter on both.
"""
import pathlib
import sys

import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
from host.inprocess import comfy_path, setup_host  # noqa: E402

COMFY_PATH = comfy_path()
NEWEST_FRONTEND_VERSION = "1.58.1"
NEWEST_FRONTEND = (TESTS_DIR.parent / ".cache" / f"frontend-{NEWEST_FRONTEND_VERSION}" / "comfyui_frontend_package"
                   / "static")
try:
    # One torch thread: the tiny test models gain nothing from more, and on a shared 2-core machine
    # OpenMP threads that spin for a busy core make every kernel up to ~70x slower.
    PACK = setup_host("cpu", threads=1)
except RuntimeError as error:
    raise pytest.UsageError(str(error)) from error


@pytest.fixture(scope="session")
def pack():
    """The pack module (``streamv2v``)."""
    return PACK


@pytest.fixture(scope="session")
def comfy_server():
    """A headless ComfyUI (--cpu) with custom nodes ``streamv2v`` (the repo) and the test nodes."""
    from host.server import ComfyServer

    with ComfyServer(comfy_path=COMFY_PATH) as srv:
        yield srv


@pytest.fixture(scope="session")
def comfy_server_newest_frontend():
    """The same server, serving the newest frontend (``--front-end-root``): started once, when first asked for."""
    from host.server import ComfyServer

    if not (NEWEST_FRONTEND / "index.html").exists():
        pytest.skip(f"frontend {NEWEST_FRONTEND_VERSION} not installed at {NEWEST_FRONTEND} (bash scripts/setup_host.sh)")
    with ComfyServer(comfy_path=COMFY_PATH, extra_args=["--front-end-root", str(NEWEST_FRONTEND)]) as srv:
        yield srv


@pytest.fixture(params=["frontend-pinned", f"frontend-{NEWEST_FRONTEND_VERSION}"])
def frontend_server(request):
    """The server a browser test opens: once with ComfyUI 0.3.75's pinned frontend, once with the newest one."""
    if request.param == "frontend-pinned":
        return request.getfixturevalue("comfy_server")
    return request.getfixturevalue("comfy_server_newest_frontend")
