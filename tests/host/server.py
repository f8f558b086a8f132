"""A real, headless ComfyUI server for end-to-end tests.

    with ComfyServer() as srv:
        info = srv.object_info()
        entry = srv.run(prompt)          # POST /prompt, poll /history/<id>
        assert "some line" in srv.log_text()

Everything the server writes goes into a temporary base directory (``--base-directory``,
output/input/temp/user and the sqlite database inside it), so the ComfyUI tree stays
untouched. Its ``custom_nodes`` folder holds symlinks: ``streamv2v`` -> the repository root
and ``streamv2v_test_nodes`` -> ``tests/host/test_nodes`` (TinyCheckpointLoader & co.).

ComfyUI imports each custom node folder under a sys.modules name equal to its *full path*
(dots replaced by ``_x_``), so the pack must use relative imports only.

Public API
----------
ComfyServer(comfy_path=None, python=None, port=None, extra_args=(), custom_nodes=None,
            startup_timeout=300.0, keep_dir=False, env=None)
  .start() / .stop() / context manager
  .url, .port, .base_dir, .output_dir, .input_dir, .log_path, .proc
  .object_info(node_class=None) -> dict
  .queue_prompt(prompt: dict, client_id=None) -> prompt_id   (raises PromptRejected on 400)
  .history(prompt_id) -> dict | None
  .wait(prompt_id, timeout=120.0) -> history entry  (raises PromptFailed on execution error)
  .run(prompt, timeout=120.0) -> history entry
  .interrupt() / .free(unload_models=True, free_memory=True)
  .output_files(entry) -> list[pathlib.Path]  (files the history entry says were saved)
  .log_text() -> str / .log_tail(n=80) -> str
  .import_failures() -> list[str]   (custom node folders ComfyUI reported "IMPORT FAILED")
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

HOST_DIR = pathlib.Path(__file__).resolve().parent
TESTS_DIR = HOST_DIR.parent
REPO_ROOT = TESTS_DIR.parent


def default_comfy_path() -> pathlib.Path:
    p = os.environ.get("COMFYUI_PATH")
    return pathlib.Path(p).resolve() if p else REPO_ROOT / ".comfyui"


def default_python() -> str:
    venv = os.environ.get("STREAMV2V_VENV")
    for cand in ([pathlib.Path(venv) / "bin" / "python"] if venv else []) + [REPO_ROOT / ".venv" / "bin" / "python"]:
        if cand.exists():
            return str(cand)
    return sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class PromptRejected(ServerError):
    """POST /prompt answered with an error (validation failed). ``.response`` holds the JSON."""

    def __init__(self, msg, response=None):
        super().__init__(msg)
        self.response = response


class PromptFailed(ServerError):
    """The prompt ran and ended with status "error". ``.entry`` holds the history entry."""

    def __init__(self, msg, entry=None):
        super().__init__(msg)
        self.entry = entry


class ComfyServer:
    def __init__(self, comfy_path=None, python=None, port=None, extra_args=(), custom_nodes=None,
                 startup_timeout: float = 300.0, keep_dir: bool = False, env: dict | None = None):
        self.comfy_path = pathlib.Path(comfy_path) if comfy_path else default_comfy_path()
        self.python = python or default_python()
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        # name -> target folder, linked into the server's custom_nodes folder
        self.custom_nodes = dict(custom_nodes) if custom_nodes is not None else {
            "streamv2v": REPO_ROOT,
            "streamv2v_test_nodes": HOST_DIR / "test_nodes",
        }
        self.startup_timeout = startup_timeout
        self.keep_dir = keep_dir
        self.env = dict(env or {})  # extra environment variables for the server process
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.base_dir = None
        self._log_file = None
        self.client_id = uuid.uuid4().hex

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ComfyServer":
        if not (self.comfy_path / "main.py").exists():
            raise ServerError(f"no ComfyUI at {self.comfy_path} (run scripts/setup_host.sh)")
        self.base_dir = pathlib.Path(tempfile.mkdtemp(prefix="comfy_srv_"))
        for sub in ("custom_nodes", "output", "input", "temp", "user", "models"):
            (self.base_dir / sub).mkdir()
        for name, target in self.custom_nodes.items():
            os.symlink(pathlib.Path(target).resolve(), self.base_dir / "custom_nodes" / name,
                       target_is_directory=True)
        self.output_dir = self.base_dir / "output"
        self.input_dir = self.base_dir / "input"
        self.log_path = self.base_dir / "comfyui.log"
        cmd = [self.python, "-u", "main.py", "--cpu",
               "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir),
               "--output-directory", str(self.output_dir),
               "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.base_dir),  # ComfyUI appends "temp"
               "--user-directory", str(self.base_dir / "user"),
               "--database-url", "sqlite:///" + str(self.base_dir / "user" / "comfyui.db"),
               "--disable-auto-launch", "--disable-api-nodes",
               "--use-pytorch-cross-attention",  # SDPA, as on GPUs (not the CPU-only sub-quadratic attention)
               *self.extra_args]
        env = dict(os.environ)
        # One torch thread (tiny test models; spinning OpenMP threads on a shared 2-core machine make
        # every kernel many times slower). Set OMP_NUM_THREADS to override.
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        env["COMFYUI_PATH"] = str(self.comfy_path)
        env.update(self.env)
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_path), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} during startup:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info/KSampler", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            time.sleep(0.25)
        raise ServerError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.base_dir is not None and not self.keep_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # ------------------------------------------------------------------ HTTP
    def _request(self, method, path, body=None, timeout=30.0):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode(errors="replace")
            raise PromptRejected(f"{method} {path} -> HTTP {e.code}: {payload}", payload) from None
        return json.loads(raw) if raw else None

    def object_info(self, node_class=None) -> dict:
        if node_class:
            return self._request("GET", f"/object_info/{node_class}")
        return self._request("GET", "/object_info", timeout=60.0)

    def queue_prompt(self, prompt: dict, client_id=None) -> str:
        resp = self._request("POST", "/prompt", {"prompt": prompt, "client_id": client_id or self.client_id})
        if resp.get("node_errors"):
            raise PromptRejected(f"prompt has node errors: {resp['node_errors']}", resp)
        return resp["prompt_id"]

    def history(self, prompt_id):
        return self._request("GET", f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    raise PromptFailed(f"prompt {prompt_id} failed: {_error_text(status)}", entry)
                if status.get("completed", True) and status.get("status_str", "success") == "success":
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI died (code {self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not done after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        return self.wait(self.queue_prompt(prompt), timeout)

    def interrupt(self):
        self._request("POST", "/interrupt", {})

    def free(self, unload_models=True, free_memory=True):
        self._request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    def output_files(self, entry: dict):
        files = []
        for node_out in (entry.get("outputs") or {}).values():
            for items in node_out.values():
                if not isinstance(items, list):
                    continue
                for it in items:
                    if isinstance(it, dict) and "filename" in it and it.get("type") == "output":
                        files.append(self.output_dir / it.get("subfolder", "") / it["filename"])
        return files

    # ------------------------------------------------------------------ logs
    def log_text(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def import_failures(self):
        return [line.split(":", 1)[-1].strip() for line in self.log_text().splitlines()
                if "(IMPORT FAILED)" in line]


def _error_text(status: dict) -> str:
    for kind, data in status.get("messages") or []:
        if kind == "execution_error":
            return "{} in node {} ({}): {}\n{}".format(
                data.get("exception_type"), data.get("node_id"), data.get("node_type"),
                data.get("exception_message"), "".join(data.get("traceback") or []))
        if kind == "execution_interrupted":
            return f"interrupted in node {data.get('node_id')} ({data.get('node_type')})"
    return json.dumps(status)
