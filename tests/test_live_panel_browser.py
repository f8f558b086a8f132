"""The performer's panel on StreamV2VLoop in headless Chromium (fake camera) against the real server: one click starts
a take (camera + queued workflow: tiny checkpoint, canny ControlNet, feature bank, CLIP on the loop), a prompt typed in
the panel reaches the running loop at the next frame (no frame dropped, the bank never cleared, the loop never
restarted, one CLIP encode), the pop-out window gets
the stage page the panel's Pop out opens gets the frames too, one click stops it (camera off, MP4 complete).
A reload mid-take, the stage in a second tab, idle_timeout and refusals: tests/test_stage_browser.py.

STREAMV2V_UPDATE_SCREENSHOTS=1 also writes docs/live_panel.png (the panel while streaming). Needs Debian's chromium.
"""
import asyncio
import json
import os
import pathlib
import shutil
import urllib.request

import pytest

from host.browser import SKIP_REASON, Chromium, available
from host.clips import read_back
from host.webcam import FAKE_CAMERA, wait_ready

REPO = pathlib.Path(__file__).resolve().parent.parent
UPDATE = bool(os.environ.get("STREAMV2V_UPDATE_SCREENSHOTS"))
SESSION, BANK = "panel_test", "panel_bank"
BLEND = 3

# The graph a performer builds, with the tests' tiny loaders in place of model files.
BUILD_GRAPH = """(async (session, bank) => {
    app.graph.clear();
    const add = (type, pos, values = {}) => {
        const node = LiteGraph.createNode(type);
        node.pos = pos;
        app.graph.add(node);
        for (const [k, v] of Object.entries(values)) {  // as the UI sets a widget: value, then its callback
            const w = node.widgets.find((w) => w.name === k);
            w.value = v;
            w.callback?.(v);
        }
        return node;
    };
    const link = (from, slot, to, name) => from.connect(slot, to, to.findInputSlot(name));
    const ckpt = add('TinyCheckpointLoader', [0, 0]);
    const pos = add('CLIPTextEncode', [0, 200], {text: 'a photo'}), neg = add('CLIPTextEncode', [0, 400], {text: ''});
    const net = add('TinyControlNetLoader', [0, 600]), image = add('EmptyImage', [0, 750], {width: 64, height: 64});
    const apply = add('ControlNetApplyAdvanced', [300, 400]);
    const fb = add('FeatureBank', [300, 0], {name: bank});
    const ea = add('ExtendedAttentionPatch', [300, 150]), ff = add('FeatureFusionPatch', [300, 250]);
    const loop = add('StreamV2VLoop', [650, 0], {source: 'browser webcam', session, width: 64, height: 64, steps: 2,
                                                 control_hint: 'canny (OpenCV)', filename_prefix: 'panel/take'});
    link(ckpt, 1, pos, 'clip'); link(ckpt, 1, neg, 'clip'); link(ckpt, 1, loop, 'clip');
    link(ckpt, 0, ea, 'model'); link(fb, 0, ea, 'bank'); link(ea, 0, ff, 'model'); link(fb, 0, ff, 'bank');
    link(ff, 0, loop, 'model'); link(ckpt, 2, loop, 'vae');
    link(pos, 0, apply, 'positive'); link(neg, 0, apply, 'negative'); link(net, 0, apply, 'control_net');
    link(image, 0, apply, 'image'); link(apply, 0, loop, 'positive'); link(apply, 1, loop, 'negative');
    window.loop = loop;
    return true; })"""
PANEL = "window.loop.streamv2vWebcam"
# Type a prompt in the panel and click Send; once the line below says the server answered, the loop's status.
SEND_PROMPT = f"""(async () => {{
    const c = {PANEL}.controls, end = performance.now() + 30000;
    c.note.textContent = '';
    c.prompt.value = 'oil painting';
    c.blend.value = {BLEND};
    c.send.click();
    while (!c.note.textContent && performance.now() < end) await new Promise((r) => setTimeout(r, 5));
    if (!c.note.textContent) throw new Error('the panel got no answer to its post in 30 s');
    return (await (await fetch('/streamv2v/loop/{SESSION}/status')).json()).taken; }})()"""


# The loop node alone, at a scale where its panel is legible; returns its rectangle on the page.
SHOW_LOOP = """(() => {
    const node = window.loop, c = app.canvas;
    app.graph._nodes.filter((n) => n !== node).forEach((n) => { n.pos = [4000, 4000]; });
    node.pos = [0, 0];
    const s = Math.min(1, (c.canvas.clientHeight - 200) / (node.size[1] + 30));
    c.ds.scale = s;
    c.ds.offset = [110 / s, 170 / s];
    app.graph.setDirtyCanvas(true, true);
    const r = c.canvas.getBoundingClientRect();
    return {x: r.left + 100, y: r.top + 170 - 40, width: (node.size[0] + 20) * s, height: (node.size[1] + 50) * s}; })()"""


async def _screenshot_node(cdp, path):
    import base64

    await cdp.close_dialogs()
    clip = await cdp.js(SHOW_LOOP)
    await asyncio.sleep(1.0)
    shot = await cdp.call("Page.captureScreenshot", format="png", clip={**clip, "scale": 1})
    pathlib.Path(path).write_bytes(base64.b64decode(shot["data"]))


def get(server, path):
    with urllib.request.urlopen(f"{server.url}{path}", timeout=10) as response:
        return json.loads(response.read())


def bank_status(server):
    return next(b for b in get(server, "/streamv2v/banks")["banks"] if b["name"] == BANK)


def running_prompts(server):
    return [item[1] for item in get(server, "/queue")["queue_running"]]


@pytest.mark.skipif(not available(), reason=SKIP_REASON)
def test_performer_panel_take_live_prompt_and_reload(comfy_server, tmp_path):
    with Chromium(comfy_server.url, FAKE_CAMERA, window=(1400, 1400)) as chrome:
        figures = asyncio.run(_take(comfy_server, chrome, tmp_path))
    print(f"\nlive prompt change: sent while frame {figures['taken_at_send']} was the newest taken, applied at frame "
          f"{figures['applied_at']} (blend {BLEND} frames); {figures['frames']} frames written, none dropped; "
          f"the stage page (Pop out) drew {figures['stage_frames']} frames")


async def _take(server, chrome, tmp_path) -> dict:
    async with chrome.page() as cdp:
        await wait_ready(cdp)
        await cdp.close_dialogs()
        await cdp.js(f"{BUILD_GRAPH}({json.dumps(SESSION)}, {json.dumps(BANK)})")
        hidden = await cdp.js("window.loop.widgets.filter((w) => w.hidden).map((w) => w.name).sort()")
        assert hidden == ["camera_index", "every_nth", "file", "hint_file", "upload"], hidden
        await cdp.js(f"{PANEL}.toggleButton.click() || true")  # one click: camera on, workflow queued
        try:
            await cdp.wait_for(f"{PANEL}.stats.shown >= 4", timeout=240)
        except TimeoutError:
            shown = await cdp.js(f"[{PANEL}.status.textContent, {PANEL}.taking, {PANEL}.stats.sent]")
            raise AssertionError(f"no frames shown: {shown}\n{server.log_tail(30)}") from None
        (prompt_id,) = running_prompts(server)
        figures = await _change_prompt(server, cdp)
        await _screenshot_node(cdp, tmp_path / "live_panel.png")
        figures["stage_frames"] = await _pop_out(cdp)
        await cdp.js(f"{PANEL}.toggleButton.click() || true")  # one click: camera off, loop stopped
        assert await cdp.js(f"{PANEL}.stream === null && !{PANEL}.taking")
        entry = await asyncio.to_thread(server.wait, prompt_id, 120)
        figures["frames"] = _check_take(server, entry)
    if UPDATE:
        shutil.copy(tmp_path / "live_panel.png", REPO / "docs" / "live_panel.png")
    return figures


async def _change_prompt(server, cdp) -> dict:
    """Type a prompt in the panel and send it; it applies at the next frame, the bank and the run go on."""
    bank_before = bank_status(server)
    taken = get(server, f"/streamv2v/loop/{SESSION}/status")["taken"]
    taken_after = await cdp.js(SEND_PROMPT)  # the status read again as soon as the server has answered the post
    state = await cdp.wait_for(f"fetch('/streamv2v/loop/{SESSION}/params').then((r) => r.json())"
                               f".then((s) => s.changes >= 1 && s)", timeout=120)
    (change,) = state["log"]
    assert change["change"] == f"prompt 'oil painting' (blend {BLEND} frames)"
    applied = change["frame"]
    # The change goes to the first frame that enters the stream after the server took it. "taken" counts a frame
    # when the loop takes it from the session, before decoding and encoding it into the stream: read before the
    # post, it may count one frame that had not entered yet (that frame gets the change: 7 taken, applied at 6).
    assert taken - 1 <= applied <= taken_after, (taken, applied, taken_after)
    await cdp.wait_for(f"{PANEL}.controls.note.textContent.startsWith('applied at frame {applied}')", timeout=30)
    shown = await cdp.js(f"{PANEL}.stats.shown")
    await cdp.wait_for(f"{PANEL}.stats.shown >= {shown + BLEND + 2}", timeout=240)  # the blend is through
    bank_after = bank_status(server)
    assert bank_after["last_reset"] == bank_before["last_reset"], "the prompt change cleared the bank"
    assert bank_after["entries"] > 0 and bank_before["entries"] > 0  # features kept (the count updates at the end)
    assert running_prompts(server), "the loop ended"
    bad = await cdp.js(f"{PANEL}.controls.post({{control_strength: 99}})")
    assert "control_strength must be a number from 0 to 10" in bad["error"]
    assert await cdp.js(f"{PANEL}.controls.note.textContent.startsWith('not changed: control_strength')")
    return {"taken_at_send": taken, "applied_at": applied}


def _check_take(server, entry) -> int:
    status = get(server, f"/streamv2v/loop/{SESSION}/status")
    assert status["dropped"] == {} and status["frames_out"] == status["taken"], status
    (video,) = [f for f in server.output_files(entry) if f.suffix == ".mp4"]
    written = status["frames_out"]
    # a constant-rate recording: every frame at its capture time on the grid (held through gaps), none lost
    assert len(read_back(video)[0]) >= written and f"wrote {written} frames" in server.log_text()
    assert bank_status(server)["frames_seen"] == written  # one bank through the whole take: never cleared
    log = server.log_text()
    assert "1 live changes (frame" in log and "ControlNet hint per frame: canny (OpenCV)" in log
    assert "1 CLIP encodes" in log  # the live prompt cost one encode
    return written


async def _pop_out(cdp) -> int:
    """Pop out opens the session's stage page (its own page: it keeps going when the editor reloads), which
    draws the frames. A click is a user gesture: no pop-up blocker."""
    await cdp.call("Runtime.evaluate", expression=f"{PANEL}.popButton.click()", userGesture=True)
    stage = f"{PANEL}.popup?.streamv2vStage"
    state = f"[!!{PANEL}.popup, {PANEL}.popup?.closed, {PANEL}.popup?.location?.pathname, {stage}?.frames ?? null]"
    try:
        frames = await cdp.wait_for(f"{stage}?.frames >= 3 && {stage}.frames", timeout=60)
    except TimeoutError:
        raise AssertionError(f"pop-out: [popup, closed, path, frames] = {await cdp.js(state)}") from None
    assert (await cdp.js(f"{PANEL}.popup.location.pathname")).endswith(f"/streamv2v/stage/{SESSION}")
    await cdp.js(f"{PANEL}.popup.close() || true")
    return frames
