"""The pack's browser webcam panel driven in headless Chromium (fake camera): shared by the browser test and
bench/webcam_link.py.

    with Chromium(server.url, FAKE_CAMERA) as chrome:
        figures = asyncio.run(measure_echo_link(server, chrome, seconds=5, size=512))
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time

FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
READY = "!!(window.app && window.app.graph && window.LiteGraph && LiteGraph.registered_node_types['StreamV2VLoop'])"
SHOW_NODE = """((name) => {
    const node = window[name];
    app.graph._nodes.filter((n) => n !== node).forEach((n) => { n.pos = [4000, 4000]; });
    const scale = Math.min(1, 540 / node.size[1]);
    node.pos = [0, 0];
    app.canvas.ds.scale = scale; app.canvas.ds.offset = [300 / scale, 150 / scale];
    app.ui.settings.setSettingValue?.('LiteGraph.Canvas.MinFontSizeForLOD', 0);
    app.graph.setDirtyCanvas(true, true);
    return true; })"""


async def wait_ready(cdp, expression: str = READY, timeout: float = 120.0):
    """Wait for the page, also while it is still navigating or reloading (an evaluate then fails: try again)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await cdp.wait_for(expression, timeout=max(1.0, deadline - time.monotonic()))
        except RuntimeError:  # "Inspected target navigated or closed"
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def add_webcam_node(cdp, node_type: str, widgets: dict, name: str) -> None:
    """Add a ``node_type`` node with ``widgets`` set, keep it as ``window[name]`` and press its Start webcam."""
    await cdp.js(f"""(async () => {{
        const node = LiteGraph.createNode({json.dumps(node_type)});
        node.pos = [80, 80];
        app.graph.add(node);
        for (const [key, value] of Object.entries({json.dumps(widgets)}))
            node.widgets.find((w) => w.name === key).value = value;
        window[{json.dumps(name)}] = node;
        await node.streamv2vWebcam.start();
        app.graph.setDirtyCanvas(true, true);
        return true; }})()""")


def echo_prompt(session: str, size: int) -> dict:
    return {"1": {"class_type": "StreamV2VWebcamEcho", "inputs": {"session": session, "width": size, "height": size}}}


async def screenshot_node(cdp, name: str, path) -> None:
    """A screenshot with ``window[name]`` in view (the page's dialogs closed, other nodes moved away)."""
    await cdp.close_dialogs()
    await cdp.js(f"{SHOW_NODE}({json.dumps(name)})")
    await asyncio.sleep(1.0)
    await cdp.screenshot(path)


async def measure_echo_link(server, chrome, seconds: float = 5.0, size: int = 512, warmup: float = 1.0,
                            screenshot=None) -> dict:
    """Frames per second shown by the panel and capture-to-display latency through StreamV2VWebcamEcho.

    The echo node runs the same session, WebSocket and sink as the loop node, with no model: what is measured
    is the link (capture, JPEG encode, send, decode, JPEG encode, send back, decode, draw).
    """
    session = f"link{size}"
    async with chrome.page() as cdp:
        await cdp.wait_for(READY, timeout=120)
        await cdp.close_dialogs()  # the start-up templates dialog (its previews keep the page busy)
        await add_webcam_node(cdp, "StreamV2VWebcamEcho", {"session": session, "width": size, "height": size}, "echo")
        prompt_id = server.queue_prompt(echo_prompt(session, size))
        stats = "window.echo.streamv2vWebcam.stats"
        await cdp.wait_for(f"{stats}.shown >= 5", timeout=60)
        await asyncio.sleep(warmup)
        first = await cdp.js(f"({{shown: {stats}.shown, t: performance.now()}})")
        await asyncio.sleep(seconds)
        last = await cdp.js(f"({{shown: {stats}.shown, t: performance.now(), sent: {stats}.sent, "
                            f"latencies: {stats}.latencies, capture: {stats}.captureMs, w: window.echo.streamv2vWebcam.output.width, "
                            f"h: window.echo.streamv2vWebcam.output.height}})")
        if screenshot is not None:
            await screenshot_node(cdp, "echo", screenshot)
        await cdp.js("window.echo.streamv2vWebcam.stop().then(() => true)")
    entry = await asyncio.to_thread(server.wait, prompt_id, 60)
    latencies = sorted(last["latencies"])
    return {"fps": (last["shown"] - first["shown"]) * 1000.0 / (last["t"] - first["t"]),
            "shown": last["shown"], "sent": last["sent"], "size": (last["w"], last["h"]),
            "latency_mean_ms": statistics.fmean(latencies),
            "latency_p50_ms": latencies[len(latencies) // 2],
            "latency_p95_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))],
            "capture_ms": statistics.fmean(last["capture"]),
            "entry": entry}
