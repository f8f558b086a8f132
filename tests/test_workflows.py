"""Every example workflow in workflows/ runs in the real ComfyUI server and produces its outputs.

Each UI-format file is converted to an API prompt (tests/host/workflows.py) with the model loaders
(CheckpointLoaderSimple, LoraLoaderModelOnly, VAELoader) swapped for the tests' tiny random-weight
models, sizes cut to 64x64 and a short generated clip in the server's input folder standing in for the
user's video. Video-model workflows (UNETLoader) get a tiny random Wan 2.1-shaped model, text encoder and VAE
instead, and a 13-frame clip (1 + 4k frames, all kept by Wan's VAE) with small chunks. Everything else
(ModelSamplingDiscrete, CLIPTextEncode, LoadVideo, the pack's nodes, CreateVideo/SaveVideo, SaveImage,
ImageStitch, ...) runs as the user would run it.
"""
import json
import pathlib
import time
import urllib.request

import av
import numpy as np
import pytest

from host.clips import make_clip
from host.workflows import TINY_SWAPS, missing_nodes, output_nodes, to_api

WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))
CLIP, FRAMES, SIZE, FPS = "streamv2v_workflow_test.mp4", 6, 64, 6
OVERRIDES = {
    "LoadVideo": {"file": CLIP},
    "StreamV2VLoop": {"file": CLIP, "width": SIZE, "height": SIZE, "max_frames": FRAMES},
    "ImageScale": {"width": SIZE, "height": SIZE},
    "EmptyLatentImage": {"width": SIZE, "height": SIZE},
}
VIDEO_MODEL = {"class_type": "TinyVideoModelLoader", "inputs": {"kind": "wan21", "seed": 0, "out_scale": 0.3}}
# The tiny SD1.5 checkpoint's CLIP (context 64) stands in for umT5; it also keeps that checkpoint in ComfyUI's
# cache, so the workflows after this one get the same model object (banks restart when their model changes).
VIDEO_SWAPS = {**TINY_SWAPS, "UNETLoader": VIDEO_MODEL, "CLIPLoader": {**TINY_SWAPS["CheckpointLoaderSimple"],
                                                                      "outputs": {0: 1}},
               "VAELoader": {**VIDEO_MODEL, "outputs": {0: 2}}}
LONG_CLIP, LONG_FRAMES = "streamv2v_workflow_test_long.mp4", 13  # 4 latent frames: chunks of 2, overlap 1
VIDEO_OVERRIDES = {"LoadVideo": {"file": LONG_CLIP}, "RandomizedBlendContext": {"chunk_length": 2, "overlap": 1}}


def test_every_workflow_has_its_own_thumbnail():
    """ComfyUI's template browser (the pinned frontend and 1.58 alike) shows <workflow>.jpg from next to the JSON:
    every workflow has one, a real JPEG of its own (tests/test_ui_browser.py makes them from its screenshots)."""
    from PIL import Image

    seen = {}
    for path in WORKFLOWS:
        thumbnail = path.with_suffix(".jpg")
        assert thumbnail.is_file(), f"{path.name} has no thumbnail {thumbnail.name}"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and image.width >= 256 and image.height >= 144, thumbnail.name
        data = thumbnail.read_bytes()
        assert data not in seen.values(), f"{thumbnail.name} is the same picture as another workflow's"
        seen[path.name] = data


def test_live_workflow_notes_name_the_panel_as_it_is():
    """A live workflow's note tells the steps the panel has (● Start queues the workflow; the stage; ■ Stop), not
    the old buttons ('Start webcam', then Queue)."""
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        if not any(n["type"] == "StreamV2VLoop" and n["widgets_values"][0] == "browser webcam"
                   for n in workflow["nodes"]):
            continue
        (note,) = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "MarkdownNote"]
        assert "**● Start**" in note and "**■ Stop**" in note and "Stage" in note, path.name
        assert "Start webcam" not in note and "Press **Queue**" not in note, path.name


def video_frames(path):
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), frames[0].shape


@pytest.fixture(scope="module")
def server(comfy_server):
    make_clip(comfy_server.input_dir / CLIP, frames=FRAMES, size=(80, 80), fps=FPS)  # with a tone: audio passes
    make_clip(comfy_server.input_dir / LONG_CLIP, frames=LONG_FRAMES, size=(80, 80), fps=FPS)
    comfy_server.info = comfy_server.object_info()
    return comfy_server


def convert(server, path, **extra):
    workflow = json.loads(path.read_text())
    if any(node["type"] == "UNETLoader" for node in workflow["nodes"]):  # a video model
        return to_api(workflow, server.info, VIDEO_SWAPS, {**OVERRIDES, **VIDEO_OVERRIDES, **extra})
    return to_api(workflow, server.info, TINY_SWAPS, {**OVERRIDES, **extra})


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def post(url, data=b""):
    headers = {"Content-Type": "image/jpeg", "X-StreamV2V-Client": "1"} if url.endswith("/frame") else \
        {"Content-Type": "application/json"}  # what the pack's state-changing routes take
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST", headers=headers),
                                timeout=10) as response:
        return json.loads(response.read() or b"null")


def run_live_webcam(server, prompt):
    """Queue a browser-webcam loop, post frames like the web extension does, press Stop, wait for the MP4."""
    import cv2

    (loop,) = [e for e in prompt.values() if e["class_type"] == "StreamV2VLoop"]
    session = loop["inputs"]["session"]
    base = f"{server.url}/streamv2v"
    prompt_id = server.queue_prompt(prompt)
    frame = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8))[1].tobytes()
    deadline, done = time.monotonic() + 120, 0
    while time.monotonic() < deadline and not get_json(f"{base}/loop/{session}/status")["running"]:
        time.sleep(0.1)  # this prompt's loop (the status shows the last take's counts until it starts)
    while time.monotonic() < deadline and done < 3:
        post(f"{base}/webcam/{session}/frame", frame)
        time.sleep(0.1)
        done = get_json(f"{base}/loop/{session}/status")["frames_out"]
    assert done >= 3, server.log_tail()
    post(f"{base}/loop/{session}/stop")
    return server.wait(prompt_id, timeout=120)


def check_outputs(server, prompt, entry):
    outputs = entry.get("outputs") or {}
    for node_id in output_nodes(prompt, server.info):
        assert node_id in outputs, f"output node {node_id} ({prompt[node_id]['class_type']}) gave nothing"
    files = server.output_files(entry)
    for f in files:
        assert f.is_file() and f.stat().st_size > 0, f
    return files


def banks(server):
    return {b["name"]: b for b in get_json(f"{server.url}/streamv2v/banks")["banks"]}


def files_by_node(server, entry):
    """{node id: [output files]} from a history entry."""
    return {node_id: server.output_files({"outputs": {node_id: out}}) for node_id, out in entry["outputs"].items()}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs(server, path):
    missing = missing_nodes(json.loads(path.read_text()), server.info)
    if missing:  # e.g. VideoHelperSuite's nodes: opened (not run) by test_ui_browser.py
        pytest.skip(f"needs the {', '.join(sorted(set(missing.values())))} pack, which the test server does not have")
    prompt = convert(server, path)
    classes = {e["class_type"] for e in prompt.values()}
    assert {"CheckpointLoaderSimple", "LoraLoaderModelOnly", "VAELoader", "UNETLoader"}.isdisjoint(classes)
    started = time.monotonic()
    live = any(e["class_type"] == "StreamV2VLoop" and e["inputs"]["source"] == "browser webcam"
               for e in prompt.values())
    entry = run_live_webcam(server, prompt) if live else server.run(prompt, timeout=300)
    files = check_outputs(server, prompt, entry)
    images = [f for f in files if f.suffix == ".png"]
    print(f"{path.name}: {time.monotonic() - started:.1f} s, outputs {[f.name for f in files]}")

    bank_nodes = [nid for nid, e in prompt.items() if e["class_type"] == "FeatureBank"]
    for nid in bank_nodes:  # the status line's data
        (status,) = entry["outputs"][nid]["streamv2v_bank"]
        assert status["name"] == prompt[nid]["inputs"]["name"] and "last_reset" in status

    stitched = "ImageStitch" in classes
    frames = LONG_FRAMES if "TinyVideoModelLoader" in classes else FRAMES
    by_node = files_by_node(server, entry)
    for node_id in (n for n, e in prompt.items() if e["class_type"] in ("SaveVideo", "StreamV2VLoop")):
        mp4s = [p.name for p in by_node.get(node_id, []) if p.suffix == ".mp4"]
        assert len(mp4s) == 1, (prompt[node_id]["class_type"], mp4s)  # every video node wrote its one MP4
    for node_id, paths in by_node.items():
        kind = prompt[node_id]["class_type"]
        for video in (p for p in paths if p.suffix == ".mp4"):
            count, shape = video_frames(video)
            assert count >= 3 if live else count == frames, (kind, video.name)
            assert shape == (SIZE, 2 * SIZE + 8 if stitched and kind == "SaveVideo" else SIZE, 3), (kind, video.name)
    if "SaveImage" in classes:
        assert images
    for nid in bank_nodes:
        assert banks(server)[prompt[nid]["inputs"]["name"]]["frames_seen"] > 0


def test_continuous_txt2img_keeps_its_bank_across_queued_runs(server):
    """Auto Queue: every run is one frame; the bank keeps counting across prompts while the prompt is edited."""
    (path,) = [p for p in WORKFLOWS if p.stem == "streamv2v_continuous_txt2img"]
    prompt = convert(server, path)
    (bank_id,) = [n for n, e in prompt.items() if e["class_type"] == "FeatureBank"]
    (text_id,) = [n for n, e in prompt.items() if e["class_type"] == "CLIPTextEncode"
                  and "cabin" in e["inputs"]["text"]]
    name = prompt[bank_id]["inputs"]["name"]
    before = banks(server).get(name, {}).get("frames_seen", 0)
    for i, edit in enumerate([" at night", " in spring"]):  # the user edits the prompt between runs
        prompt[text_id]["inputs"]["text"] += edit
        entry = server.run(prompt, timeout=120)
        assert server.output_files(entry)
        assert banks(server)[name]["frames_seen"] == before + i + 1


FILE_BASED = [p for p in WORKFLOWS if p.stem in ("streamv2v_video_file", "streamv2v_ab_bank",
                                                  "streamv2v_long_video_loop")]


@pytest.mark.parametrize("path", FILE_BASED, ids=[p.stem for p in FILE_BASED])
def test_unchanged_requeue_runs_nothing_and_a_changed_setting_restarts_with_the_reason(server, path):
    """Users re-queue constantly: nothing may run again (no new file), and an edited sampler setting starts
    the stream afresh with a log line that says what changed."""
    prompt = convert(server, path)
    server.run(prompt, timeout=300)
    files_before = sorted(server.output_dir.rglob("*"))
    entry = server.run(prompt, timeout=300)
    cached = {node for kind, data in entry["status"]["messages"] if kind == "execution_cached" for node in data["nodes"]}
    assert cached == set(prompt), f"re-ran: {sorted(set(prompt) - cached)}"
    assert sorted(server.output_dir.rglob("*")) == files_before, "an unchanged re-queue wrote a new file"

    samplers = [e for e in prompt.values() if e["class_type"] in ("StreamV2VSampler", "StreamV2VLoop")]
    for sampler in samplers:
        sampler["inputs"]["strength"] = 0.45
    log_start = len(server.log_text())
    server.run(prompt, timeout=300)
    (bank_id,) = [n for n, e in prompt.items() if e["class_type"] == "FeatureBank"]
    name = prompt[bank_id]["inputs"]["name"]
    assert f"StreamV2V bank '{name}' cleared: strength changed 0.4 -> 0.45" in server.log_text()[log_start:]
    assert banks(server)[name]["last_reset"] == "strength changed 0.4 -> 0.45"
