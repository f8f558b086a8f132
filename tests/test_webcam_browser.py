"""The browser webcam path end to end: headless Chromium with a fake camera, the pack's web extension, the
real ComfyUI server and StreamV2VLoop. Saves a screenshot (tmp_path/webcam.png).

Needs Debian's chromium (/usr/bin/chromium); skipped without it. Talks to Chromium over the DevTools
protocol with aiohttp's websocket client (a ComfyUI dependency).
"""
import asyncio

import pytest

from host.browser import SKIP_REASON, Chromium, available
from host.prompts import webcam_loop_prompt

SESSION = "browser_test"



@pytest.mark.skipif(not available(), reason=SKIP_REASON)
def test_browser_webcam_streams_through_the_loop(comfy_server, tmp_path):
    with Chromium(comfy_server.url, ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]) as chrome:
        asyncio.run(_drive(comfy_server, chrome, tmp_path))


async def _drive(server, chrome, tmp_path):
    async with chrome.page() as cdp:
        await cdp.wait_for("!!(window.app && window.app.graph && window.LiteGraph && "
                           "LiteGraph.registered_node_types['StreamV2VLoop'])", timeout=120)
        await cdp.js(f"""(async () => {{
            const node = LiteGraph.createNode("StreamV2VLoop");
            node.pos = [80, 80];
            app.graph.add(node);
            node.widgets.find((w) => w.name === "session").value = "{SESSION}";
            window.streamv2vTestNode = node;
            await node.streamv2vWebcam.start();
            app.graph.setDirtyCanvas(true, true);
            return true; }})()""")
        prompt_id = server.queue_prompt(webcam_loop_prompt(SESSION, "webcam/browser"))
        frames = await cdp.wait_for("Number(window.streamv2vTestNode.streamv2vWebcam.output.dataset.frames || 0)"
                                    " >= 3 && window.streamv2vTestNode.streamv2vWebcam.output.dataset.frames",
                                    timeout=180)
        size = await cdp.js("[window.streamv2vTestNode.streamv2vWebcam.output.naturalWidth, "
                            "window.streamv2vTestNode.streamv2vWebcam.output.naturalHeight]")
        assert size == [64, 64]
        await cdp.close_dialogs()  # the start-up templates dialog
        await cdp.js("""(() => {
            app.canvas.ds.scale = 0.5; app.canvas.ds.offset = [0, 0];
            window.streamv2vTestNode.pos = [60, 40];
            app.graph.setDirtyCanvas(true, true); return true; })()""")
        await asyncio.sleep(1.0)
        await cdp.screenshot(tmp_path / "webcam.png")
        print(f"screenshot: {tmp_path / 'webcam.png'} ({frames} restyled frames shown)")
        await cdp.js("window.streamv2vTestNode.streamv2vWebcam.stop().then(() => true)")
    entry = await asyncio.to_thread(server.wait, prompt_id, 120)
    (video,) = [f for f in server.output_files(entry) if f.suffix == ".mp4"]
    import av
    with av.open(str(video)) as container:
        written = sum(1 for _ in container.decode(video=0))
    assert written >= int(frames)
    assert (tmp_path / "webcam.png").stat().st_size > 10_000
