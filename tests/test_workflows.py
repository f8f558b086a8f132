"""Every example workflow in example_workflows/ runs in the real ComfyUI server and produces its outputs.

Each UI-format file is converted to an API prompt (tests/host/workflows.py) with the model loaders
(CheckpointLoaderSimple, LoraLoaderModelOnly, VAELoader) swapped for the tests' tiny random-weight
models, sizes cut to 64x64 and a short generated clip in the server's input folder standing in for the
user's video. Everything else (ModelSamplingDiscrete, CLIPTextEncode, LoadVideo, the pack's nodes,
CreateVideo/SaveVideo, SaveImage, ImageStitch, ...) runs as the user would run it.
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

WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parent.parent / "example_workflows").glob("*.json"))
CLIP, FRAMES, SIZE, FPS = "streamv2v_workflow_test.mp4", 6, 64, 6
OVERRIDES = {
    "LoadVideo": {"file": CLIP},
    "StreamV2VLoop": {"file": CLIP, "width": SIZE, "height": SIZE, "max_frames": FRAMES},
    "ImageScale": {"width": SIZE, "height": SIZE},
    "EmptyLatentImage": {"width": SIZE, "height": SIZE},
}


def video_frames(path):
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), frames[0].shape


@pytest.fixture(scope="module")
def server(comfy_server):
    make_clip(comfy_server.input_dir / CLIP, frames=FRAMES, size=(80, 80), fps=FPS)  # with a tone: audio passes
    comfy_server.info = comfy_server.object_info()
    return comfy_server


def convert(server, path, **extra):
    return to_api(json.loads(path.read_text()), server.info, TINY_SWAPS, {**OVERRIDES, **extra})


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def post(url, data=b""):
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=10) as response:
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
    while time.monotonic() < deadline and done < 3:
        if get_json(f"{base}/loop/{session}/status")["running"]:
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
    assert {"CheckpointLoaderSimple", "LoraLoaderModelOnly", "VAELoader"}.isdisjoint(classes)
    started = time.monotonic()
    live = any(e["class_type"] == "StreamV2VLoop" and e["inputs"]["source"] == "browser webcam"
               for e in prompt.values())
    entry = run_live_webcam(server, prompt) if live else server.run(prompt, timeout=300)
    files = check_outputs(server, prompt, entry)
    videos = [f for f in files if f.suffix == ".mp4"]
    images = [f for f in files if f.suffix == ".png"]
    print(f"{path.name}: {time.monotonic() - started:.1f} s, outputs {[f.name for f in files]}")

    bank_nodes = [nid for nid, e in prompt.items() if e["class_type"] == "FeatureBank"]
    for nid in bank_nodes:  # the status line's data
        (status,) = entry["outputs"][nid]["streamv2v_bank"]
        assert status["name"] == prompt[nid]["inputs"]["name"] and "last_reset" in status

    stitched = "ImageStitch" in classes
    for node_id, paths in files_by_node(server, entry).items():
        kind = prompt[node_id]["class_type"]
        for video in (p for p in paths if p.suffix == ".mp4"):
            count, shape = video_frames(video)
            assert count >= 3 if live else count == FRAMES, (kind, video.name)
            assert shape == (SIZE, 2 * SIZE + 8 if stitched and kind == "SaveVideo" else SIZE, 3), (kind, video.name)
    if "SaveImage" in classes:
        assert images
    name = next(prompt[n]["inputs"]["name"] for n in bank_nodes)
    assert banks(server)[name]["frames_seen"] > 0


def test_continuous_txt2img_keeps_its_bank_across_queued_runs(server):
    """Auto Queue: every run is one frame; the bank (reset off) keeps counting across prompts."""
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
    assert prompt[bank_id]["inputs"]["reset"] is False
