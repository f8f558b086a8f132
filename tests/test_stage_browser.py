"""A performer's evening in headless Chromium (fake camera) against the real server, on the shipped toy-model live
workflow (workflows/streamv2v_live_webcam_toy.json: no checkpoint needed):

* a workflow the server refuses (the ControlNet one, whose model file is missing here) shows the server's message in
  the panel, the toggle returns to Start and the camera is released;
* the toy workflow: opened (click 1) and Start (click 2) give restyled frames, with no other click; the controls
  show the server's values (a stale slider is reset when the take starts, a control this graph cannot use is
  disabled with the reason, a refused change snaps back) and the prompt in effect;
* a second tab on the stage URL receives the frames; Ctrl+Enter's second copy of the workflow is refused;
* the editor is reloaded mid-take: its panel shows live frames again by itself (zero clicks), the stage tab too;
* the editor tab is closed without Stop: the loop ends by idle_timeout, the queue runs the next prompt, and the
  MP4 plays and lasts as long as the take.

``panel_classic_and_vue`` is the panel on the newest frontend (1.58), classic and Vue nodes, run by
tests/test_ui_browser.py on its newest-frontend server. STREAMV2V_UPDATE_SCREENSHOTS=1 also writes
docs/stage.jpg (the stage page). Needs Debian's chromium.
"""
import asyncio
import json
import os
import pathlib
import time

import av
import pytest

from host.browser import SKIP_REASON, Chromium, available
from host.webcam import FAKE_CAMERA, READY, wait_ready

REPO = pathlib.Path(__file__).resolve().parent.parent
UPDATE = bool(os.environ.get("STREAMV2V_UPDATE_SCREENSHOTS"))
TOY = REPO / "workflows" / "streamv2v_live_webcam_toy.json"
CONTROLNET = REPO / "workflows" / "streamv2v_live_webcam_controlnet.json"
PANEL = "window.loop.streamv2vWebcam"
IDLE_S = 25  # longer than a reload of the editor on a busy machine (12-16 s here); the default is 30 s
CHEAP = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
         "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}

# Open a workflow as the template browser does, keep its loop node as window.loop, set widgets.
OPEN = """(async (workflow, name, values) => {
    await app.loadGraphData(workflow, true, true, name);
    const loop = (app.graph.nodes ?? app.graph._nodes).find((n) => n.type === 'StreamV2VLoop');
    for (const [k, v] of Object.entries(values)) loop.widgets.find((w) => w.name === k).value = v;
    window.loop = loop;
    return true; })"""


async def open_workflow(cdp, path, **values):
    await cdp.js(f"{OPEN}({path.read_text()}, {json.dumps(path.stem)}, {json.dumps(values)})")
    await asyncio.sleep(0.5)
    await cdp.close_dialogs()  # the missing-models warning: the test server has no model files


def running(server):
    return [item[1] for item in server._request("GET", "/queue")["queue_running"]]


@pytest.mark.skipif(not available(), reason=SKIP_REASON)
def test_performer_takes_the_stage(comfy_server, tmp_path):
    with Chromium(comfy_server.url, FAKE_CAMERA, window=(1400, 1300)) as chrome:
        figures = asyncio.run(_evening(comfy_server, chrome, tmp_path))
    if UPDATE:  # a JPEG of the stage page at 800 px wide (the page itself: the output full window on black)
        from PIL import Image

        with Image.open(tmp_path / "stage.png") as shot:
            shot = shot.convert("RGB")
            shot.resize((800, round(800 * shot.height / shot.width)), Image.LANCZOS) \
                .save(REPO / "docs" / "stage.jpg", "JPEG", quality=85, optimize=True)
    print("\n" + "\n".join(f"{k}: {v}" for k, v in figures.items()))


async def _evening(server, chrome, tmp_path) -> dict:
    figures = {}
    async with chrome.page() as editor:
        await wait_ready(editor)
        await editor.close_dialogs()
        await _refused_workflow_speaks(editor)
        clicks = 1  # opening the template
        # the template as it is (session "webcam": what the page restores after a reload), a short idle_timeout
        await open_workflow(editor, TOY, idle_timeout=IDLE_S)
        await editor.js(f"{PANEL}.controls.setSlider({PANEL}.controls.alpha, 0.3) || true")  # a stale value
        started = time.monotonic()
        await editor.js(f"{PANEL}.toggleButton.click() || true")
        clicks += 1
        latency = await editor.wait_for(f"{PANEL}.stats.shown >= 1 && {PANEL}.stats.latencyMs", timeout=240)
        first_captured = time.monotonic() - latency / 1000.0  # the take (and its MP4) starts at this frame
        await editor.wait_for(f"{PANEL}.stats.shown >= 3", timeout=240)
        figures["clicks to the first restyled frame"] = clicks
        figures["seconds from Start to 3 frames shown"] = round(time.monotonic() - started, 1)
        (take_id,) = running(server)
        await _controls_follow_the_server(editor)
        await _second_copy_is_refused(server, editor, take_id)
        stage_tab = chrome.open_tab(await editor.js(f"{PANEL}.stageUrl()"))
        async with chrome.page(stage_tab) as stage:
            await stage.wait_for("window.streamv2vStage?.frames >= 3", timeout=60)
            await stage.screenshot(tmp_path / "stage.png")
            figures.update(await _reload_mid_take(editor, stage))
        next_id = server.queue_prompt(CHEAP)
        closed_at = time.monotonic()
    chrome.close_tab()  # the editor tab, without Stop
    entry = await asyncio.to_thread(server.wait, take_id, IDLE_S + 60)
    figures["seconds from closing the editor to the loop's end"] = round(time.monotonic() - closed_at, 1)
    await asyncio.to_thread(server.wait, next_id, 60)  # the queue went on
    assert f"no frame for {IDLE_S} s: ended by idle_timeout" in server.log_text()
    (video,) = [f for f in server.output_files(entry) if f.suffix == ".mp4"]
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        seconds = count / float(stream.average_rate)
    take = closed_at - first_captured  # from the first frame captured to the tab closing
    figures["MP4"] = f"{count} frames at {float(stream.average_rate):g} fps = {seconds:.1f} s; take {take:.1f} s"
    assert abs(seconds - take) < 3.0, figures["MP4"]
    return figures


async def _refused_workflow_speaks(editor):
    """The ControlNet workflow names a model file the server lacks: refused when queued; a filename_prefix that
    leaves the output folder: the loop raises when it runs. Either way its message shows, the take ends at once
    (the toggle says Start again, the camera is off)."""
    for path, values, start, words in ((CONTROLNET, {"session": "refused"}, "not started", "control_net_name"),
                                       (TOY, {"session": "failed", "filename_prefix": "../outside"}, "failed",
                                        "filename_prefix")):
        await open_workflow(editor, path, **values)
        await editor.js(f"{PANEL}.toggleButton.click() || true")
        await editor.wait_for(f"!{PANEL}.taking && {PANEL}.status.textContent.startsWith('{start}')", timeout=60)
        text = await editor.js(f"{PANEL}.status.textContent")
        assert words in text and "(node " in text, text
        assert await editor.js(f"{PANEL}.stream === null && {PANEL}.toggleButton.textContent.includes('Start')")


async def _controls_follow_the_server(editor):
    """Server values, not the panel's guesses: reset at the take's start, disabled with a reason, snap back."""
    controls = f"{PANEL}.controls"
    await editor.wait_for(f"{controls}.state?.running && {controls}.alpha.input.value === '0.75'", timeout=30)
    reason = await editor.js(f"[{controls}.strength.input.disabled, {controls}.strength.input.title]")
    assert reason[0] and "no ControlNet" in reason[1], reason  # the toy workflow has no ControlNet
    answer = await editor.js(f"{controls}.post({{ff_alpha: 7}})")
    assert not answer["ok"] and "ff_alpha must be a number from 0 to 1" in answer["error"], answer
    assert await editor.js(f"{controls}.alpha.input.value") == "0.75"  # snapped back
    await editor.js(f"(() => {{ {controls}.prompt.value = 'a photo'; {controls}.send.click(); return true; }})()")
    await editor.wait_for(f"{controls}.effect.textContent.includes(\"'a photo'\")", timeout=60)


async def _second_copy_is_refused(server, editor, take_id):
    """Ctrl+Enter on the canvas while the take runs: the server refuses the copy, naming the session."""
    await editor.js("app.queuePrompt(0, 1).then(() => true)")
    await editor.close_dialogs()
    assert running(server) == [take_id] and not server._request("GET", "/queue")["queue_pending"]


async def _reload_mid_take(editor, stage) -> dict:
    before = await stage.js("window.streamv2vStage.frames")
    await editor.js("window.streamv2vOldPage = true")
    reloaded = time.monotonic()
    await editor.call("Page.reload", ignoreCache=False)
    await wait_ready(editor, f"!window.streamv2vOldPage && {READY}")
    await editor.wait_for("!!(app.graph.nodes ?? app.graph._nodes).find((n) => n.type === 'StreamV2VLoop')")
    await editor.js("(() => { window.loop = (app.graph.nodes ?? app.graph._nodes)"
                    ".find((n) => n.type === 'StreamV2VLoop'); return true; })()")
    # no click: the panel rejoins the running loop, camera on again, with a latency on its own clock
    state = f"[{PANEL}.taking, {PANEL}.status.textContent, {PANEL}.session, JSON.stringify(sessionStorage)]"
    try:
        await editor.wait_for(f"{PANEL}.stats.shown >= 3 && {PANEL}.stats.latencyMs > 0", timeout=120)
    except TimeoutError:
        raise AssertionError(f"no rejoin after the reload: {await editor.js(state)}") from None
    back = time.monotonic() - reloaded
    latency = await editor.js(f"{PANEL}.stats.latencyMs")
    shown = await stage.wait_for(f"window.streamv2vStage.frames >= {before + 3} && window.streamv2vStage.frames")
    assert 0 < latency < 30_000
    return {"seconds from reload to live frames again (no click)": round(back, 1),
            "latency shown after the reload (ms)": round(latency), "stage tab frames": shown}


async def panel_classic_and_vue(editor):
    """The toy workflow's panel takes frames with classic nodes, then with Vue nodes ("Nodes 2.0"): the panel is a DOM
    widget and keeps drawing; Stop ends the take. Run by tests/test_ui_browser.py on the newest frontend."""
    await open_workflow(editor, TOY, session="newest", idle_timeout=IDLE_S)
    await editor.js(f"{PANEL}.toggleButton.click() || true")
    await editor.wait_for(f"{PANEL}.stats.shown >= 3", timeout=240)
    stage = await editor.js("document.querySelector('.streamv2v-stage-url')?.textContent")
    assert stage.endswith("/streamv2v/stage/newest"), stage
    vue = await editor.js("""(async () => {
        const s = app.ui.settings, set = (s.setSettingValueAsync ?? s.setSettingValue).bind(s);
        await set('Comfy.VueNodes.Enabled', true);
        return s.getSettingValue('Comfy.VueNodes.Enabled'); })()""")
    assert vue is True
    shown = await editor.js(f"{PANEL}.stats.shown")
    await editor.wait_for(f"{PANEL}.stats.shown >= {shown + 3} && !!{PANEL}.output.getClientRects().length",
                          timeout=120)
    await editor.js(f"{PANEL}.toggleButton.click() || true")
    await editor.wait_for(f"!{PANEL}.taking", timeout=30)
    await editor.js("(app.ui.settings.setSettingValueAsync ?? app.ui.settings.setSettingValue)"
                    ".call(app.ui.settings, 'Comfy.VueNodes.Enabled', false)")
