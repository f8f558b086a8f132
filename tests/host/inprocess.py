"""ComfyUI in-process with the pack loaded as ``streamv2v``: for tests/conftest.py, benchmarks and the demo.

Usage (first thing, before importing torch-heavy or comfy modules)::

    from host.inprocess import setup_host    # bench scripts: from _host import setup_host
    pack = setup_host(device="cpu")          # or "cuda"
    from streamv2v.nodes.engine import run_stream
    from host import tiny_models             # tests/host helpers (random-weight models)

- ComfyUI is taken from $COMFYUI_PATH or <repo>/.comfyui (``bash scripts/setup_host.sh``).
- ``device="cpu"`` sets ``comfy.cli_args.args.cpu = True`` before ``comfy.model_management``
  is imported; ``device="cuda"`` leaves ComfyUI's own device choice.
- The pack (the repository root) is loaded as package ``streamv2v``; the repository root is
  never put on sys.path (its ``nodes/`` would shadow ComfyUI's ``nodes.py``).
- ``tests/`` is put on sys.path so ``from host import tiny_models`` works.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

TESTS_DIR = pathlib.Path(__file__).resolve().parent.parent
REPO_ROOT = TESTS_DIR.parent
BENCH_DIR = REPO_ROOT / "bench"
PACK_NAME = "streamv2v"


def comfy_path() -> pathlib.Path:
    """Where ComfyUI is: $COMFYUI_PATH or <repo>/.comfyui."""
    return pathlib.Path(os.environ.get("COMFYUI_PATH") or (REPO_ROOT / ".comfyui")).resolve()


def setup_host(device: str = "cpu", threads: int | None = None, cuda_malloc: bool = False):
    """Make ComfyUI importable, bind it to ``device`` ("cpu" or "cuda") and load the pack.

    Returns the pack module (``streamv2v``). Call once, before anything imports
    ``comfy.model_management``; calling again returns the already loaded pack.
    ``cuda_malloc``: choose the CUDA allocator as ComfyUI's ``main.py`` does (its ``cuda_malloc.py``:
    cudaMallocAsync on CUDA builds of torch, set before torch is imported); else PyTorch's native one.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    root = comfy_path()
    if not (root / "comfy" / "model_management.py").exists():
        raise RuntimeError(f"ComfyUI not found at {root}: run `bash scripts/setup_host.sh` or set COMFYUI_PATH")
    repo_real = os.path.realpath(REPO_ROOT)
    bench_real = os.path.realpath(BENCH_DIR)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != repo_real]
    for extra in (str(TESTS_DIR), str(root), bench_real):
        if extra not in sys.path:
            sys.path.insert(0, extra)
    if "comfy.model_management" in sys.modules:
        raise RuntimeError("comfy.model_management was imported before setup_host(): call it first")

    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    comfy.cli_args.args.disable_auto_launch = True
    # PyTorch's SDPA attention, as ComfyUI uses on GPUs (on a CPU it would pick its sub-quadratic
    # attention, whose Python loop over chunks no GPU user runs).
    comfy.cli_args.args.use_pytorch_cross_attention = True
    comfy.cli_args.args.disable_cuda_malloc = not cuda_malloc
    if cuda_malloc and device == "cuda":
        if "torch" in sys.modules:
            raise RuntimeError("torch was imported before setup_host(cuda_malloc=True): the allocator is chosen first")
        import cuda_malloc as _  # noqa: F401  (ComfyUI's module: sets PYTORCH_CUDA_ALLOC_CONF on import)

    import torch

    torch.set_num_threads(threads or max(1, min(os.cpu_count() or 2, 8)))

    import comfy.model_management  # noqa: F401  (now bound to the chosen device)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False

    init = REPO_ROOT / "__init__.py"
    spec = importlib.util.spec_from_file_location(PACK_NAME, init, submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module
