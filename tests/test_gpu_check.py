"""The GPU check's offline path, on the CPU: ``bench/gpu_bundle.sh`` here (it downloads), then
``bench/gpu_check.sh`` with a stand-in for the GPU machine's Python (torch and the image's packages only,
``host/offline_python.py``) and the network blocked: no CUDA -> exit status 2 and its line; ``--device cpu
--dry-run`` -> the rows run from the bundle (ComfyUI's tree, torchsde, av, ...), the table says so. Nothing
may reach the network or call pip/apt/curl/wget (each attempt is noted in a log that must stay empty).
"""
import os
import subprocess
import sys

import pytest

from host.inprocess import BENCH_DIR, REPO_ROOT, comfy_path
from host.offline_python import offline_env, offline_python


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """``bash bench/gpu_bundle.sh`` into a temporary folder (downloads from PyPI; pip's cache makes it quick)."""
    folder = tmp_path_factory.mktemp("bundle") / "gpu_bundle"
    env = {**os.environ, "GPU_BUNDLE": str(folder), "COMFYUI_PATH": str(comfy_path()), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCH_DIR / "gpu_bundle.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ready:" in done.stderr
    return folder


def check(args, python, env, prefix, timeout=600):
    return subprocess.run([*prefix, "bash", str(BENCH_DIR / "gpu_check.sh"), *args], cwd=REPO_ROOT, timeout=timeout,
                          env={**env, "PYTHON": str(python)}, capture_output=True, text=True)


def test_the_bundle_holds_comfyui_and_the_wheels_a_pytorch_image_lacks_within_60_mib(bundle):
    names = sorted(p.name for p in (bundle / "wheels").iterdir())
    # ComfyUI's (torchsde, trampoline, einops, tqdm), the pack's pure-Python requirements, PyAV for Python 3.11+
    assert {"av", "einops", "torchsde", "tqdm", "trampoline", "python_osc"} <= {n.split("-")[0] for n in names}
    assert not [n for n in names if not n.endswith("-none-any.whl") and not n.startswith("av-")], names
    manifest = (bundle / "manifest.txt").read_text()
    assert "ComfyUI 0.3.75" in manifest and all(name in manifest for name in names)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"bundle: {size / 2**20:.1f} MiB")
    assert size <= 60 * 2**20


def test_gpu_check_runs_offline_from_the_bundle(bundle, tmp_path):
    python = offline_python(tmp_path)
    log = tmp_path / "offline.log"
    env, prefix = offline_env(tmp_path, log)
    env.update(GPU_BUNDLE=str(bundle), GPU_CHECK_WORK=str(tmp_path / "work"))
    absent = subprocess.run([str(python), "-c", "import importlib.util as u; print([m for m in ('torchsde', 'av', "
                             "'einops', 'trampoline', 'pythonosc') if u.find_spec(m)])"], capture_output=True,
                            text=True, env=env)
    assert absent.stdout.strip() == "[]", absent  # the stand-in lacks what the bundle must bring

    no_gpu = check([], python, env, prefix)
    assert no_gpu.returncode == 2, no_gpu.stdout + no_gpu.stderr[-3000:]
    assert no_gpu.stdout.startswith("no CUDA device found")
    assert "from the bundle: torchsde" in no_gpu.stderr and "av-" in no_gpu.stderr

    out = tmp_path / "gpu_check.md"
    dry = check(["--device", "cpu", "--dry-run", "--rows", "2", "--frames", "4", "--warmup", "5", "--out", str(out)],
                python, env, prefix)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-5000:]
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1:5] == ["DyMe(1)", "default", "-", "default"], row  # ran compiled (dynamo's eager backend)
    assert float(cells[5]) > 0 and int(cells[14].split("/")[0]) > 0, row  # fps; compiled UNet calls
    assert "NaN/Inf values in the rows' output frames: 0" in text and "set up in" in text
    assert not log.exists() or not log.read_text(), log.read_text()  # no network, no pip/apt/curl/wget


def test_a_time_budget_skips_the_rest_and_says_so(tmp_path):
    """``--budget`` shorter than the workers' start: every row is listed, stopped or skipped, exit status 0."""
    out = tmp_path / "gpu_check.md"
    done = subprocess.run([sys.executable, str(BENCH_DIR / "gpu_check.py"), "--device", "cpu", "--dry-run",
                           "--budget", "1", "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COMFYUI_PATH": str(comfy_path())})
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.count("stopped at the time budget") + text.count("time budget") >= 9, text
    assert "9 of 9 rows done or skipped" in text


def test_rows_run_in_the_order_of_what_matters_each_under_both_allocators():
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH_DIR))
    steps = gpu_check.plan(gpu_check.parse_args([]))
    assert [(n, r.bank, r.mode, a) for n, r, a in steps[:6]] == [
        (1, "DyMe(1)", "off", "cudaMallocAsync"), (1, "DyMe(1)", "off", "native"),
        (2, "DyMe(1)", "default", "cudaMallocAsync"), (2, "DyMe(1)", "default", "native"),
        (3, "DyMe(1)", "CUDA graphs", "cudaMallocAsync"), (3, "DyMe(1)", "CUDA graphs", "native")]
    assert [r.kind for _, r, _ in steps[-2:]] == ["drift", "pinned"] and steps[-1][2] == "native"
    assert len(steps) == 7 * 2 + 2
