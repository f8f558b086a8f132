"""Per-frame ControlNet hints and live steering of StreamV2VLoop in the real server.

* Each frame's hint reaches the ControlNet on its own row of the stream batch: a recording test ControlNet
  (tests/host/test_nodes/control_nodes.py) keeps a digest of every hint row of every ControlNet call, and the
  digests are compared with the canny of each decoded source frame, and with each frame of a hint video.
* POST /streamv2v/loop/{session}/params: bad values get a 400 that names the rule and change nothing, unknown
  sessions a 404, oversized bodies a 413; a good change is applied at the next frame and listed in the report.
"""
import collections
import json
import urllib.request

import pytest
import torch

from host.clips import make_clip
from host.prompts import loop_prompt, webcam_loop_prompt
from host.waiting import wait_until
from test_loop_server import image_bytes, request

STEPS = 2


def digest(hint: torch.Tensor) -> tuple[float, float]:
    """What the recording ControlNet keeps of a hint row ``[3, H, W]``: its mean and its x-weighted mean."""
    row = hint.float()
    x = torch.linspace(0, 1, row.shape[-1])
    return round(float(row.mean()), 5), round(float((row * x).mean()), 5)  # as control_nodes._digest


def controlnet_prompt(prefix: str, clip_name: str, **loop_inputs) -> dict:
    """Tiny checkpoint -> text -> Apply ControlNet (recording tiny ControlNet, placeholder image) -> loop."""
    prompt = loop_prompt(prefix, file=clip_name, width=64, height=64, steps=STEPS, **loop_inputs)
    prompt.update({
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo"}},
        "11": {"class_type": "TinyControlNetLoader", "inputs": {"seed": 0, "record": True}},
        "12": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "13": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["10", 0], "negative": ["10", 0], "control_net": ["11", 0], "image": ["12", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
    })
    prompt["3"]["inputs"].update(positive=["13", 0], negative=["13", 1])
    return prompt


def recorded_rows(server) -> list[list]:
    with urllib.request.urlopen(f"{server.url}/streamv2v_test/controlnet_hints", timeout=10) as response:
        return [call["hints"] for call in json.loads(response.read())["calls"]]


def forget_rows(server) -> None:
    request(f"{server.url}/streamv2v_test/controlnet_hints", method="DELETE")


def expected_hints(path, make) -> list[tuple[float, float]]:
    from streamv2v.streamv2v_core.media.video_io import VideoFileSource

    source = VideoFileSource(str(path))
    try:
        return [digest(make(frame)[0].movedim(-1, 0)) for frame in source]
    finally:
        source.close()


def check_rows(calls, expected):
    """Every frame's own hint went through all its steps, and no call repeated one frame's hint on other rows."""
    seen = collections.Counter(tuple(row) for call in calls for row in call)
    assert seen == collections.Counter({h: STEPS for h in expected}), (seen, expected)
    for call in calls:
        rows = [tuple(row) for row in call]
        assert len(set(rows)) == len(rows), f"one hint on several rows of a call: {rows}"


@pytest.mark.parametrize("mode", ["canny (OpenCV)", "hint video"])
def test_each_frame_carries_its_own_hint_through_the_stream_batch(comfy_server, mode):
    from streamv2v.streamv2v_core.media import hints

    make_clip(comfy_server.input_dir / "hint_src.mp4", frames=8, fps=8, tone=False)
    # the hint video: another moving pattern (a bar moving the other way), so each frame's hint is its own
    make_clip(comfy_server.input_dir / "hint_hint.mp4", frames=8, size=(64, 64), fps=8, tone=False)
    extra = {"hint_file": "hint_hint.mp4"} if mode == "hint video" else {}
    prompt = controlnet_prompt(f"hints/{mode.split()[0]}", "hint_src.mp4", control_hint=mode, **extra)
    forget_rows(comfy_server)
    entry = comfy_server.run(prompt, timeout=300)
    assert comfy_server.output_files(entry)
    path = comfy_server.input_dir / ("hint_hint.mp4" if mode == "hint video" else "hint_src.mp4")
    expected = expected_hints(path, hints.as_hint if mode == "hint video" else hints.canny)
    check_rows(recorded_rows(comfy_server), expected)
    assert f"ControlNet hint per frame: {mode} (8 frames)" in comfy_server.log_text()


def test_live_params_route_checks_every_value(comfy_server):
    session = "params_route"
    base = f"{comfy_server.url}/streamv2v/loop"
    code, body = request(f"{base}/nobody_runs_this/params", json.dumps({"ff_alpha": 0.5}).encode())
    assert code == 404 and "no loop is running on session 'nobody_runs_this'" in json.loads(body)["error"]
    code, _ = request(f"{base}/{'x' * 70}/params", b"{}")
    assert code == 400
    prompt_id = comfy_server.queue_prompt(webcam_loop_prompt(session, "live/params", steps=1))
    try:
        wait_until(lambda: json.loads(request(f"{base}/{session}/status")[1])["running"], what="the loop to start")
        for payload, status, message in [
            (b"not json", 400, "the body is not JSON"),
            (json.dumps({"ff_alpha": 2}).encode(), 400, "ff_alpha must be a number from 0 to 1, got 2"),
            (json.dumps({"prompt": "oil"}).encode(), 400, "no CLIP connected"),
            (json.dumps({"control_strength": 0.5}).encode(), 400, "holds no ControlNet"),
            (json.dumps({"blend_frames": 4, "x": 1}).encode(), 400, "unknown field(s) 'x'"),
            (b"{" + b" " * (70 * 1024) + b"}", 413, "over 64 KiB"),
        ]:
            code, body = request(f"{base}/{session}/params", payload)
            assert code == status and message in json.loads(body)["error"], (code, body)
        assert json.loads(request(f"{base}/{session}/params")[1])["pending"] == 0  # nothing was queued
        code, body = request(f"{base}/{session}/params", json.dumps({"blend_frames": 4}).encode())
        assert code == 200 and json.loads(body)["accepted"] == {"blend_frames": 4}
        post = lambda: request(f"{comfy_server.url}/streamv2v/webcam/{session}/frame", image_bytes(64, 64))  # noqa
        state = wait_until(lambda: post() and json.loads(request(f"{base}/{session}/params")[1])["changes"] == 1
                           and json.loads(request(f"{base}/{session}/params")[1]), what="the change to apply")
        assert state["log"] == [{"frame": 0, "change": "blend frames 4"}] and state["current"]["blend_frames"] == 4
    finally:
        request(f"{base}/{session}/stop", b"")
    comfy_server.wait(prompt_id, timeout=120)
    assert "1 live changes (frame 0: blend frames 4)" in comfy_server.log_text()
