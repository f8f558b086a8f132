"""Headless Chromium driven over the DevTools protocol (aiohttp's websocket client, a ComfyUI dependency).

    with Chromium(url, extra_args=[...]) as chrome:          # skip when CHROMIUM is missing
        asyncio.run(drive(chrome))

    async def drive(chrome):
        tab = chrome.open_tab(other_url)                      # a second tab: chrome.page(tab) drives it
        async with chrome.page() as cdp:                      # the first tab (the one opened on ``url``)
            await cdp.wait_for("!!window.app")
            await cdp.js("1 + 1")
            await cdp.screenshot(path)

Needs Debian's chromium at /usr/bin/chromium (scripts/setup_host.sh installs it when run as root).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

from host.server import free_port

CHROMIUM = "/usr/bin/chromium"
SKIP_REASON = "needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)"


def available() -> bool:
    return os.path.exists(CHROMIUM)


class Cdp:
    """Minimal DevTools client: ``await cdp.call(method, **params)`` and ``await cdp.js(expression)``."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method, answer_within=60.0, **params):
        """The result of one DevTools command; TimeoutError naming it when no answer comes in ``answer_within``
        seconds (the page's own events keep arriving meanwhile: each wait is for what is left of the deadline)."""
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        deadline = time.monotonic() + answer_within
        while True:
            try:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise asyncio.TimeoutError
                message = json.loads((await self.ws.receive(timeout=left)).data)
            except asyncio.TimeoutError:
                raise TimeoutError(f"chromium did not answer {method} within {answer_within:g} s") from None
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def js(self, expression):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {expression}")

    async def press_escape(self):
        for kind in ("keyDown", "keyUp"):
            await self.call("Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape", windowsVirtualKeyCode=27)

    async def close_dialogs(self):
        """Close the start-up templates dialog and any other modal ComfyUI shows."""
        await self.press_escape()
        await self.js("(() => { document.querySelectorAll('.p-dialog-mask').forEach((e) => e.remove()); "
                      "return true; })()")

    async def screenshot(self, path):
        shot = await self.call("Page.captureScreenshot", format="png")
        data = base64.b64decode(shot["data"])
        with open(path, "wb") as f:
            f.write(data)
        return len(data)


class Chromium:
    """A headless Chromium showing ``url``; ``page()`` connects a Cdp to its first tab."""

    def __init__(self, url, extra_args=(), window=(1280, 900)):
        self.url, self.extra_args, self.window = url, list(extra_args), window
        self.port, self.proc, self.profile = free_port(), None, None

    def __enter__(self):
        self.profile = tempfile.mkdtemp(prefix="streamv2v_chromium_")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}", f"--remote-debugging-port={self.port}", "--remote-allow-origins=*",
             f"--window-size={self.window[0]},{self.window[1]}", *self.extra_args, self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        shutil.rmtree(self.profile, ignore_errors=True)
        return False

    def _devtools(self, path, method="GET"):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"null")

    def page_ws_url(self, target=None, timeout=30.0):
        """The DevTools URL of tab ``target`` (an id from ``open_tab``), or of the first tab (the one on ``url``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pages = [t for t in self._devtools("/json/list") if t.get("type") == "page"]
                if target is None and pages:
                    self.first_tab = getattr(self, "first_tab", None) or pages[-1]["id"]  # newest tabs list first
                    target = self.first_tab
                for page in pages:
                    if page["id"] == target:
                        return page["webSocketDebuggerUrl"]
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError("chromium did not open its DevTools port (or the tab is gone)")

    def open_tab(self, url) -> str:
        """Open ``url`` in a new tab; returns its target id (for ``page`` and ``close_tab``)."""
        self.page_ws_url()  # remember the first tab before there are two
        return self._devtools(f"/json/new?{urllib.parse.quote(url, safe='')}", method="PUT")["id"]

    def close_tab(self, target=None) -> None:
        """Close a tab as a user would (no beforeunload dialog): ``target`` or the first tab."""
        target = target or getattr(self, "first_tab", None)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/close/{target}")
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()

    @contextlib.asynccontextmanager
    async def page(self, target=None):
        import aiohttp

        async with aiohttp.ClientSession() as http, \
                http.ws_connect(self.page_ws_url(target), max_msg_size=0) as ws:
            yield Cdp(ws)
