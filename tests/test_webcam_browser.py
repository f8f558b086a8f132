"""The browser webcam end to end over its WebSocket: headless Chromium with a fake camera, the pack's web
extension, the real ComfyUI server, StreamV2VLoop with a tiny model, and StreamV2VWebcamEcho (the same link
without a model) measured at 512x512. Saves a screenshot (tmp_path/webcam.png).

Needs Debian's chromium (/usr/bin/chromium); skipped without it. Talks to Chromium over the DevTools
protocol with aiohttp's websocket client (a ComfyUI dependency). Frame rate and latency are printed, not
asserted: bench/webcam_link.py measures them longer. Screenshots: tmp_path/webcam.png (the loop node) and
tmp_path/webcam_echo.png (the echo node with its figures).
"""
import asyncio

import av
import pytest

from host.browser import SKIP_REASON, Chromium, available
from host.prompts import webcam_loop_prompt
from host.webcam import FAKE_CAMERA, READY, add_webcam_node, measure_echo_link, screenshot_node

SESSION = "browser_test"


@pytest.mark.skipif(not available(), reason=SKIP_REASON)
def test_browser_webcam_over_the_websocket(comfy_server, tmp_path):
    with Chromium(comfy_server.url, FAKE_CAMERA) as chrome:
        frames = asyncio.run(_loop_through_the_model(comfy_server, chrome, tmp_path))
        link = asyncio.run(measure_echo_link(comfy_server, chrome, seconds=4.0, size=512,
                                             screenshot=tmp_path / "webcam_echo.png"))
    assert frames >= 3 and (tmp_path / "webcam.png").stat().st_size > 10_000
    assert link["size"] == (512, 512) and link["shown"] > 10 and 0 < link["latency_p50_ms"] < 10_000
    print(f"\nWebSocket webcam, identity (StreamV2VWebcamEcho) at 512x512 on loopback: {link['fps']:.1f} fps shown, "
          f"latency capture->display mean {link['latency_mean_ms']:.1f} ms, p50 {link['latency_p50_ms']:.1f}, "
          f"p95 {link['latency_p95_ms']:.1f} ({link['sent']} frames sent)")


async def _loop_through_the_model(server, chrome, tmp_path) -> int:
    async with chrome.page() as cdp:
        await cdp.wait_for(READY, timeout=120)
        await add_webcam_node(cdp, "StreamV2VLoop", {"session": SESSION, "width": 64, "height": 64}, "loop")
        prompt_id = server.queue_prompt(webcam_loop_prompt(SESSION, "webcam/browser"))
        panel = "window.loop.streamv2vWebcam"
        frames = await cdp.wait_for(f"{panel}.stats.shown >= 3 && {panel}.stats.shown", timeout=180)
        size = await cdp.js(f"[{panel}.output.width, {panel}.output.height, {panel}.stats.latencyMs]")
        assert size[:2] == [64, 64] and size[2] > 0
        await screenshot_node(cdp, "loop", tmp_path / "webcam.png")
        status = await cdp.js(f"{panel}.status.textContent")
        print(f"screenshot: {tmp_path / 'webcam.png'} ({frames} restyled frames shown; status: {status})")
        await cdp.js(f"{panel}.stop().then(() => true)")
    entry = await asyncio.to_thread(server.wait, prompt_id, 120)
    (video,) = [f for f in server.output_files(entry) if f.suffix == ".mp4"]
    with av.open(str(video)) as container:
        written = sum(1 for _ in container.decode(video=0))
    assert written >= int(frames)
    return int(frames)
