"""The ComfyUI page with the pack in headless Chromium, on ComfyUI 0.3.75's pinned frontend and on the newest one
(1.58): every example workflow opens with no missing node types (except another pack's nodes that the workflow
names with their pack, e.g. VideoHelperSuite's), the frontend turns it into the same prompt as the tests'
converter, and the FeatureBank status line shows the bank after a run (also with Vue nodes and in a subgraph). On
the newest frontend the performer's panel takes frames with classic and Vue nodes too. Saves a screenshot per
workflow to tmp_path.

STREAMV2V_UPDATE_SCREENSHOTS=1 also writes docs/screenshots/<workflow>.png, docs/nodes.png (the
video-to-video graph, for the README) and workflows/<workflow>.jpg (the thumbnail ComfyUI's template browser shows:
both the pinned frontend and 1.58 ask for /api/workflow_templates/<pack>/<workflow>.jpg). Needs Debian's chromium (/usr/bin/chromium); skipped without it.
"""
import asyncio
import json
import os
import pathlib
import shutil

import pytest

from host.browser import SKIP_REASON, Chromium, available
from host.webcam import FAKE_CAMERA
from host.workflows import TINY_SWAPS, missing_nodes, to_api
from test_stage_browser import panel_classic_and_vue

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
UPDATE = bool(os.environ.get("STREAMV2V_UPDATE_SCREENSHOTS"))
WINDOW = (1920, 1080)

FIT_VIEW = """((margin) => {
    const c = app.canvas, items = [...app.graph._nodes.map((n) => [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30]),
                                   ...(app.graph._groups || []).map((g) => g._bounding || g.bounding)];
    const x0 = Math.min(...items.map((b) => b[0])), y0 = Math.min(...items.map((b) => b[1]));
    const x1 = Math.max(...items.map((b) => b[0] + b[2])), y1 = Math.max(...items.map((b) => b[1] + b[3]));
    const w = c.canvas.clientWidth, h = c.canvas.clientHeight, top = 80, left = 60;
    const s = Math.min((w - left - margin) / (x1 - x0), (h - top - margin) / (y1 - y0), 1.0);
    c.ds.scale = s;
    c.ds.offset = [left / s - x0, top / s - y0];
    app.graph.setDirtyCanvas(true, true);
    const r = c.canvas.getBoundingClientRect();  // where the graph is drawn on the page (for the thumbnail)
    return [r.left + left, r.top + top, (x1 - x0) * s, (y1 - y0) * s]; })(30)"""

# Nodes whose type is not registered. (Not ``has_errors``: frontend 1.58 sets it on a node whose model file is
# missing too, and the test server has no model files.)
MISSING = """(() => app.graph._nodes
    .filter((n) => !LiteGraph.registered_node_types[n.type])
    .map((n) => `${n.id}:${n.type}`))()"""

TIDY_PAGE = """(async () => {
    const span = [...document.querySelectorAll('span')].find((e) => e.textContent.startsWith('Introducing Nodes'));
    let banner = span?.parentElement;
    while (banner && banner.querySelectorAll('button').length < 2) banner = banner.parentElement;
    banner?.querySelectorAll('button')[banner.querySelectorAll('button').length - 1]?.click();
    const settings = app.ui.settings;
    const set = (settings.setSettingValueAsync ?? settings.setSettingValue).bind(settings);
    await set('Comfy.Minimap.Visible', false);
    await set('LiteGraph.Canvas.MinFontSizeForLOD', 0);  // draw text at any zoom (legible screenshots)
    return true; })()"""

WIDGETS = "app.graph.serialize().nodes.map((n) => [n.id, n.type, n.widgets_values ?? null])"

CLIENT_ID = "(window.comfyAPI?.api?.api ?? app.api)?.clientId ?? sessionStorage.getItem('clientId')"


@pytest.mark.skipif(not available(), reason=SKIP_REASON)
def test_workflows_open_in_the_browser(frontend_server, tmp_path, request):
    info = frontend_server.object_info()
    pinned = request.node.callspec.id == "frontend-pinned"
    update = UPDATE and pinned  # the docs show ComfyUI 0.3.75's own frontend
    with Chromium(frontend_server.url, FAKE_CAMERA, window=WINDOW) as chrome:
        shots, graphs = asyncio.run(_drive(frontend_server, chrome, info, tmp_path, update, pinned))
    assert sorted(shots) == sorted(p.stem for p in WORKFLOWS)
    for name, path in shots.items():
        assert path.stat().st_size > 20_000, name
        if update:
            (REPO / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
            shutil.copy(path, REPO / "docs" / "screenshots" / f"{name}.png")
            save_thumbnail(path, graphs[name], REPO / "workflows" / f"{name}.jpg")
            if name == "streamv2v_video_file":
                shutil.copy(path, REPO / "docs" / "nodes.png")
    print("screenshots:", ", ".join(str(p) for p in shots.values()))


def save_thumbnail(screenshot, graph, path, size=(480, 270)):
    """A template-browser thumbnail (JPEG, 16:9) of the part of a workflow's screenshot that shows its graph
    (``graph``: x, y, width, height on the page)."""
    from PIL import Image

    x, y, width, height = graph
    width, height = max(width, height * size[0] / size[1]), max(height, width * size[1] / size[0])
    cx, cy = graph[0] + graph[2] / 2, graph[1] + graph[3] / 2
    with Image.open(screenshot) as image:
        box = (cx - width / 2 - 10, cy - height / 2 - 10, cx + width / 2 + 10, cy + height / 2 + 10)
        image.convert("RGB").crop(tuple(round(v) for v in box)).resize(size, Image.LANCZOS) \
            .save(path, "JPEG", quality=85, optimize=True)


async def _drive(server, chrome, info, tmp_path, update, pinned):
    shots, graphs = {}, {}
    async with chrome.page() as cdp:
        await cdp.wait_for("!!(window.app && app.graph && window.LiteGraph && "
                           "LiteGraph.registered_node_types['FeatureBank'])", timeout=120)
        await cdp.wait_for("app.extensions.some((e) => e.name === 'StreamV2V.BankStatus')", timeout=30)
        names = await cdp.js("app.extensions.map((e) => e.name).filter((n) => n.startsWith('StreamV2V'))")
        assert {"StreamV2V.BankStatus", "StreamV2V.Webcam"} <= set(names)
        await cdp.close_dialogs()
        await cdp.js(TIDY_PAGE)
        for path in WORKFLOWS:
            workflow = json.loads(path.read_text())
            await cdp.js(f"app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(path.stem)})"
                         ".then(() => true)")
            await asyncio.sleep(1.0)
            await cdp.close_dialogs()  # a missing-models warning: the test server has no model files
            assert await cdp.js("app.graph._nodes.length") == len(workflow["nodes"]), path.name
            external = missing_nodes(workflow, info)  # another pack's nodes, each naming its pack
            expected = sorted(f"{n['id']}:{n['type']}" for n in workflow["nodes"] if n["id"] in external)
            assert sorted(await cdp.js(MISSING)) == expected, f"{path.name}: missing node types"

            # Every widget value lands in the widget it is meant for: the frontend keeps them all, adds none.
            # (DOM widgets such as the webcam panel may add a trailing "" of their own.)
            # A node without widgets: 0.3.75's pinned frontend saves [] and 1.58 nothing (both read as none).
            saved = {n["id"]: n.get("widgets_values") or None for n in workflow["nodes"]}
            for node_id, kind, values in await cdp.js(WIDGETS):
                want, values = saved[node_id], values or None
                if want is None or values is None or isinstance(want, dict):  # dict: VideoHelperSuite's named values
                    assert want == values, f"{path.name}: node {node_id} ({kind})"
                    continue
                assert values[:len(want)] == want and set(values[len(want):]) <= {""}, \
                    f"{path.name}: node {node_id} ({kind}) widgets {values} != {want}"

            # The frontend's own prompt for this graph equals the converter's (widget order, links, notes); the
            # frontend sends another pack's missing nodes without a class, and the converter leaves them out.
            frontend = (await cdp.js("app.graphToPrompt().then((p) => p.output)"))
            ours = to_api(workflow, info, allow_missing=bool(external))
            assert {k: (v["class_type"], v["inputs"]) for k, v in frontend.items() if int(k) not in external} == \
                   {k: (v["class_type"], v["inputs"]) for k, v in ours.items()}, path.name

            if path.stem == "streamv2v_continuous_txt2img":
                await _bank_status_line(server, cdp, workflow, info)
            graphs[path.stem] = await cdp.js(FIT_VIEW)
            await asyncio.sleep(1.0)
            shots[path.stem] = tmp_path / f"{path.stem}.png"
            await cdp.screenshot(shots[path.stem])
        status_shot = await _status_line_everywhere(server, cdp, tmp_path)
        if update:
            shutil.copy(status_shot, REPO / "docs" / "bank_status.png")
        if not pinned:  # the performer's panel on the newest frontend, classic and Vue nodes (pinned: the
            await panel_classic_and_vue(cdp)  # performer's test, tests/test_stage_browser.py)
    return shots, graphs


async def _bank_status_line(server, cdp, workflow, info):
    """Run the workflow (tiny models) for this page's client: the status line appears and follows the bank."""
    prompt = to_api(workflow, info, TINY_SWAPS, {"EmptyLatentImage": {"width": 64, "height": 64}})
    (bank_id,) = [n for n, e in prompt.items() if e["class_type"] == "FeatureBank"]
    prompt[bank_id]["inputs"]["name"] = "browser_status"
    await cdp.js(f"(() => {{ const n = app.graph.getNodeById({bank_id}); "
                 "n.widgets.find((w) => w.name === 'name').value = 'browser_status'; return true; })()")
    client_id = await cdp.js(CLIENT_ID)
    assert client_id
    prompt_id = server.queue_prompt(prompt, client_id=client_id)
    await asyncio.to_thread(server.wait, prompt_id, 120)
    # executed (status before sampling: 0 frames), then the refresh after the prompt (1 frame).
    text = await cdp.wait_for(f"(() => {{ const n = app.graph.getNodeById({bank_id}); "
                              "return n.streamv2vBankStatus?.frames_seen >= 1 && n.streamv2vBankText; })()",
                              timeout=30)
    assert text.startswith("1 frame seen · ") and " MiB held · last reset: " in text, text
    # The line is a DOM widget: real text on the page (the Vue renderer never draws on the canvas).
    shown = await cdp.js(STATUS_ELEMENTS)
    assert any(t.startswith("1 frame seen · ") for t, visible in shown if visible), shown


STATUS_ELEMENTS = """[...document.querySelectorAll('.streamv2v-bank-status-text')]
    .map((e) => [e.textContent, !!(e.offsetParent || e.getClientRects().length)])"""


async def _status_line_everywhere(server, cdp, tmp_path):
    """The status line with the Vue node renderer, inside a subgraph, and its Clear button (issue 9)."""
    (path,) = [p for p in WORKFLOWS if p.stem == "streamv2v_continuous_txt2img"]
    workflow = json.loads(path.read_text())
    await cdp.js(f"app.loadGraphData({json.dumps(workflow)}, true, true, 'status').then(() => true)")
    await asyncio.sleep(1.0)
    await cdp.close_dialogs()
    (bank_id,) = [n["id"] for n in workflow["nodes"] if n["type"] == "FeatureBank"]
    await cdp.js(f"(() => {{ const n = app.graph.getNodeById({bank_id}); "
                 "n.widgets.find((w) => w.name === 'name').value = 'browser_status'; return true; })()")
    await cdp.js("app.streamv2vRefreshBanks()")
    await cdp.wait_for(STATUS_ELEMENTS + ".some(([t, v]) => v && t.includes('frame seen'))", timeout=30)
    await cdp.js(FIT_VIEW)
    await asyncio.sleep(0.5)
    shot = tmp_path / "bank_status_canvas.png"
    await cdp.screenshot(shot)

    vue = await cdp.js("""(async () => {
        const settings = app.ui.settings, set = (settings.setSettingValueAsync ?? settings.setSettingValue).bind(settings);
        try { await set('Comfy.VueNodes.Enabled', true); } catch (e) { return 'no Vue renderer: ' + e.message; }
        return settings.getSettingValue('Comfy.VueNodes.Enabled'); })()""")
    if vue is True:
        await asyncio.sleep(2.0)
        await cdp.wait_for(STATUS_ELEMENTS + ".some(([t, v]) => v && t.includes('frame seen'))", timeout=30)
        await cdp.screenshot(tmp_path / "bank_status_vue.png")
        await cdp.js("(app.ui.settings.setSettingValueAsync ?? app.ui.settings.setSettingValue)"
                     ".call(app.ui.settings, 'Comfy.VueNodes.Enabled', false)")
        await asyncio.sleep(1.0)
    print(f"Vue node renderer: {vue}")

    # Into a subgraph: the FeatureBank node inside it still gets its line, refreshed from the server.
    inner = await cdp.js(f"""(async () => {{
        const node = app.graph.getNodeById({bank_id});
        if (!app.graph.convertToSubgraph) return 'no subgraphs in this frontend';
        app.graph.convertToSubgraph(new Set([node]));
        await app.streamv2vRefreshBanks();
        const inside = [...app.streamv2vBankNodes].filter((n) => n.graph !== app.graph);
        return inside.map((n) => n.streamv2vBankText ?? null); }})()""")
    assert inner == "no subgraphs in this frontend" or (len(inner) == 1 and inner[0].startswith("1 frame seen")), inner
    # The Clear button clears the bank on the server and says so.
    cleared = await cdp.js("""(async () => {
        const node = [...app.streamv2vBankNodes].find((n) => n.streamv2vBankStatus);
        await node.streamv2vStatusLine.clear();
        return node.streamv2vBankText; })()""")
    assert cleared.startswith("0 frames seen") and "cleared with the Clear bank button" in cleared, cleared
    return shot
