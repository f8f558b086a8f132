"""The instrument (web/streamv2v_instrument.js) in headless Chromium against the real server, with a scripted MIDI input.

``navigator.requestMIDIAccess`` is replaced, before the page loads, by a stub holding one input whose messages the
test sends. MIDI-learn binds a CC to the strength slider and a note to preset 2; the CC's values reach the loop's
route mapped onto strength's range, the note and the key 2 recall the stored preset, and the mapping and presets
survive saving and loading the workflow. Without a secure context the panel says MIDI needs one.

STREAMV2V_UPDATE_SCREENSHOTS=1 also writes docs/midi_map.png (the panel's mapping view). Needs Debian's chromium.
"""
import asyncio
import base64
import os
import pathlib
import shutil

import pytest

from host.browser import SKIP_REASON, Chromium, available
from host.webcam import READY

REPO = pathlib.Path(__file__).resolve().parent.parent
UPDATE = bool(os.environ.get("STREAMV2V_UPDATE_SCREENSHOTS"))

MIDI_STUB = """(() => {
    const input = { id: 'stub', name: 'Stub MIDI controller', onmidimessage: null };
    window.midiSend = (bytes) => input.onmidimessage?.({ data: new Uint8Array(bytes) });
    navigator.requestMIDIAccess = async () => ({ inputs: new Map([['stub', input]]), outputs: new Map(),
                                                 onstatechange: null });
})();"""
INSECURE = "Object.defineProperty(window, 'isSecureContext', { value: false });"

# A loop node whose live controls' posts are recorded (the route itself is tested in the server tests).
ADD_LOOP = """(() => {
    app.graph.clear();
    const node = LiteGraph.createNode('StreamV2VLoop');
    node.pos = [0, 0];
    app.graph.add(node);
    window.loop = node;
    return true; })()"""
RECORD_POSTS = """(() => {
    window.posts = [];
    const controls = window.loop.streamv2vWebcam.controls;
    controls.post = async (body) => { window.posts.push(body); return {}; };
    return true; })()"""
INSTRUMENT = "window.loop.streamv2vWebcam.instrument"


def row(control):
    return f"{INSTRUMENT}.midi.view.querySelector('tr[data-control=\"{control}\"]')"


async def posts_with(cdp, key, value=None):
    test = f"p.{key} !== undefined" + (f" && p.{key} === {value}" if value is not None else "")
    return await cdp.wait_for(f"window.posts.find((p) => {test})", timeout=30)


async def recalled(cdp, n, seed):
    """The change a recall of preset ``n`` posted: the preset's own values, or ``{"preset": n}`` when the server
    holds the workflow's presets (it takes them for a session another test's loop has left registered)."""
    return await cdp.wait_for(f"window.posts.find((p) => p.seed === {seed} || p.preset === {n})", timeout=30)


async def learn(cdp, control, message):
    await cdp.js(f"{row(control)}.querySelector('.streamv2v-learn').click() || true")
    assert await cdp.js(f"{row(control)}.textContent.includes('move a control')")
    await cdp.js(f"midiSend({message}) || true")
    return await cdp.js(f"{row(control)}.children[1].textContent")


async def press_key(cdp, key):
    await cdp.js(f"window.loop.streamv2vWebcam.root.focus() || true")
    for kind in ("keyDown", "keyUp"):
        await cdp.call("Input.dispatchKeyEvent", type=kind, key=key, code=f"Digit{key}", text=key if kind == "keyDown"
                       else "", windowsVirtualKeyCode=48 + int(key))


@pytest.mark.skipif(not available(), reason=SKIP_REASON)
def test_midi_learn_cc_mapping_note_presets_and_save_load(comfy_server, tmp_path):
    with Chromium(comfy_server.url, window=(1400, 1400)) as chrome:
        asyncio.run(_play(chrome, tmp_path))
    if UPDATE:
        shutil.copy(tmp_path / "midi_map.png", REPO / "docs" / "midi_map.png")


async def _open(cdp, init_script):
    await cdp.call("Page.enable")
    await cdp.call("Page.addScriptToEvaluateOnNewDocument", source=init_script)
    await cdp.call("Page.reload", ignoreCache=True)
    await asyncio.sleep(1.0)
    await cdp.wait_for(READY, timeout=120)
    await cdp.close_dialogs()
    await cdp.js(ADD_LOOP)
    await cdp.wait_for(f"!!{INSTRUMENT}", timeout=30)


async def _play(chrome, tmp_path):
    async with chrome.page() as cdp:
        await _open(cdp, MIDI_STUB)
        await cdp.wait_for(f"{INSTRUMENT}.midi.status.textContent === 'MIDI: Stub MIDI controller'", timeout=30)
        await cdp.js(RECORD_POSTS)
        await cdp.js(f"{INSTRUMENT}.midi.mapButton.click() || true")
        await cdp.wait_for(f"{INSTRUMENT}.midi.view.offsetHeight > 100", timeout=30)  # once the canvas laid it out
        # learn: CC 21 on channel 1 drives strength, note 36 on channel 10 recalls preset 2
        assert await learn(cdp, "strength", "[0xB0, 21, 64]") == "CC 21 · ch 1"
        assert await learn(cdp, "preset_2", "[0x99, 36, 100]") == "note 36 · ch 10"
        assert await cdp.js("JSON.stringify(window.loop.properties.streamv2v_midi)") == \
            '{"strength":{"kind":"cc","channel":1,"number":21},"preset_2":{"kind":"note","channel":10,"number":36}}'
        # CC values mapped onto strength's range (0.01 .. 1), the newest sent
        await cdp.js("midiSend([0xB0, 21, 127]) || true")
        await posts_with(cdp, "strength", 1)
        await cdp.js("midiSend([0xB0, 21, 0]) || true")
        await posts_with(cdp, "strength", 0.01)
        await cdp.js("midiSend([0xB1, 21, 90]) || true")  # another channel: not this knob
        # store preset 2 at strength 0.5 and seed 77, move away, recall it by the note and by the key 2
        await cdp.js(f"""(() => {{ const i = {INSTRUMENT}; i.live.setSlider(i.strength, 0.5); i.seed.value = 77;
                         i.bank.storeButton.click(); i.bank.buttons[1].click(); return true; }})()""")
        await cdp.wait_for("window.loop.properties.streamv2v_presets[1]?.seed === 77", timeout=30)
        await cdp.js("window.posts.length = 0; midiSend([0xB0, 21, 127]) || true")
        await posts_with(cdp, "strength", 1)
        await cdp.js("window.posts.length = 0; midiSend([0x99, 36, 100]) || true")
        change = await recalled(cdp, 2, 77)
        assert change.get("strength", 0.5) == 0.5 and await cdp.js(f"Number({INSTRUMENT}.strength.input.value)") == 0.5
        await cdp.js("window.posts.length = 0")
        await press_key(cdp, "2")
        await recalled(cdp, 2, 77)
        assert not await cdp.js("window.posts.some((p) => p.strength === 90 / 127)")  # channel 2's CC did nothing
        await _screenshot_mapping(cdp, tmp_path / "midi_map.png")
        await _save_and_load(cdp)
    async with chrome.page() as cdp:
        await _open(cdp, INSECURE)
        assert "needs a secure context" in await cdp.js(f"{INSTRUMENT}.midi.status.textContent")


async def _save_and_load(cdp):
    """Save the workflow as JSON, load it back: the new node has the mapping and the presets and plays them."""
    await cdp.js("(async () => { const saved = JSON.stringify(app.graph.serialize()); app.graph.clear(); "
                 "await app.loadGraphData(JSON.parse(saved)); "
                 "window.loop = app.graph._nodes.find((n) => n.type === 'StreamV2VLoop'); return true; })()")
    await cdp.wait_for(f"!!{INSTRUMENT}", timeout=30)
    await cdp.js(RECORD_POSTS)
    assert await cdp.js(f"{row('strength')}.children[1].textContent") == "CC 21 · ch 1"
    assert await cdp.js("window.loop.properties.streamv2v_presets[1].seed") == 77
    await cdp.js("midiSend([0xB0, 21, 127]) || true")
    await posts_with(cdp, "strength", 1)
    await cdp.js("midiSend([0x99, 36, 1]) || true")
    await recalled(cdp, 2, 77)
    # a workflow saved before the loop had osc_port, osc_host, record_take and idle_timeout (0.3): loaded, they
    # keep sane values
    older = await cdp.js("""(async () => {
        const saved = app.graph.serialize();
        const node = saved.nodes.find((n) => n.type === 'StreamV2VLoop');
        const names = window.loop.widgets.filter((w) => w.serialize !== false).map((w) => w.name);
        node.widgets_values.splice(names.indexOf('osc_port'), 4);
        app.graph.clear();
        await app.loadGraphData(saved);
        const loop = app.graph._nodes.find((n) => n.type === 'StreamV2VLoop');
        const value = (name) => loop.widgets.find((w) => w.name === name).value;
        return [value('osc_port'), value('osc_host'), value('record_take'), value('idle_timeout'),
                value('guidance')]; })()""")
    assert older == [0, "127.0.0.1", True, 30, "full CFG"], older


async def _screenshot_mapping(cdp, path):
    await cdp.close_dialogs()
    await cdp.js("""(() => { const c = app.canvas; window.loop.pos = [0, 0]; c.ds.scale = 1;
        c.ds.offset = [80, 110 - (window.loop.size[1] - 560)]; app.graph.setDirtyCanvas(true, true); return true; })()""")
    await asyncio.sleep(1.0)
    clip = await cdp.js(f"""(() => {{ const r = {INSTRUMENT}.root.getBoundingClientRect();
        return {{x: Math.max(0, r.left - 10), y: Math.max(0, r.top - 10), width: r.width + 20,
                 height: r.height + 20}}; }})()""")
    shot = await cdp.call("Page.captureScreenshot", format="png", clip={**clip, "scale": 1})
    pathlib.Path(path).write_bytes(base64.b64decode(shot["data"]))
