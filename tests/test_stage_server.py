"""The stage and a take's life in the real server, with a camera in Python (tests/host/camera_client.py):

* GET /streamv2v/stage/{session}/mjpeg read by a plain HTTP client gives successive JPEGs while the loop runs;
* a loop whose camera went quiet ends by itself after idle_timeout, says so in its report, and the queue runs
  the next prompt; its MP4 is constant frame rate and lasts as long as the take;
* the latency a viewer computes from the echoed stamp equals capture-to-display of the frame whose pixels it
  shows, found by the output's ordinal alone (not by the stamp), in every bank_start mode;
* a second live loop for a session that has one running or queued is refused at POST /prompt, naming the
  session; an input a live source does not read (the hidden `file`) is not validated for it.
"""
import asyncio
import json
import statistics
import time
import urllib.error
import urllib.request

import av
import pytest

from host.camera_client import CameraClient, read_mjpeg
from host.prompts import loop_prompt, webcam_loop_prompt
from host.server import PromptRejected
from streamv2v.streamv2v_core.live.viewers import CONTENT_TYPE

CHEAP = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
         "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def get(server, path):
    with urllib.request.urlopen(f"{server.url}{path}", timeout=10) as response:
        return json.loads(response.read())


def post(server, path):
    request = urllib.request.Request(f"{server.url}{path}", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})  # the request guard's rule
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def mp4_frames_and_duration(path) -> tuple[int, float, float]:
    """(frames, seconds, frame rate) of a video as a player sees it."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f for f in container.decode(stream)]
        rate = float(stream.average_rate)
        end = float((frames[-1].pts + frames[-1].duration) * frames[-1].time_base) if frames[-1].duration \
            else float(frames[-1].pts * frames[-1].time_base) + 1 / rate
        return len(frames), end - float(frames[0].pts * frames[0].time_base), rate


async def _take_until_idle(server, session, frames):
    async with CameraClient(server.url, session, size=64, frames=frames) as camera:
        parts = await asyncio.to_thread(read_mjpeg, f"{server.url}/streamv2v/stage/{session}/mjpeg", 3)
        await camera.wait_outputs(frames)
    return camera, parts


def test_take_ends_by_idle_timeout_with_a_constant_rate_mp4_and_the_stage_stream(comfy_server):
    session, fps, frames = "stage_idle", 10.0, 6
    prompt_id = comfy_server.queue_prompt(webcam_loop_prompt(session, "stage/idle", idle_timeout=2.0, fps=fps))
    next_id = comfy_server.queue_prompt(CHEAP)  # waits in the queue behind the take
    camera, parts = asyncio.run(_take_until_idle(comfy_server, session, frames))
    # successive JPEGs from a plain HTTP client while the loop ran
    numbers = [int(headers["x-streamv2v-frame"]) for headers, jpeg, _ in parts]
    assert all(jpeg[:2] == b"\xff\xd8" and headers["content-type"] == "image/jpeg" for headers, jpeg, _ in parts)
    assert numbers == sorted(numbers) and len(set(numbers)) >= 2, numbers  # the newest, resent while idle
    # the camera went quiet: the loop ends by itself after 2 s, and the queue goes on
    quiet_at = time.monotonic()
    entry = comfy_server.wait(prompt_id, 60)
    assert time.monotonic() - quiet_at < 30
    comfy_server.wait(next_id, 60)
    log = comfy_server.log_text()
    assert "no frame for 2 s: ended by idle_timeout" in log, comfy_server.log_tail(20)
    (video,) = [f for f in comfy_server.output_files(entry) if f.suffix == ".mp4"]
    count, seconds, rate = mp4_frames_and_duration(video)
    take = (camera.sent[-1][1] - camera.sent[0][1]) / 1000.0 + 1 / fps  # first capture to last, plus one frame
    assert rate == pytest.approx(fps)
    assert seconds == pytest.approx(take, abs=3 / fps), (seconds, take, count)
    print(f"\nidle take: {frames} frames sent over {take:.2f} s -> MP4 {count} frames at {rate:g} fps = {seconds:.2f} s")


MODES = ["fresh", "continue", "continue, frames in flight"]
STEPS = 2  # frames in flight: output i shows input i - 1


async def _measure(server, session, outputs):
    async with CameraClient(server.url, session, size=64) as camera:
        await camera.wait_outputs(2)  # warm: the stream started
        parts = await asyncio.to_thread(read_mjpeg, f"{server.url}/streamv2v/stage/{session}/mjpeg", outputs)
        status = get(server, f"/streamv2v/loop/{session}/status")
        post(server, f"/streamv2v/loop/{session}/stop")
    return camera, parts, status


def test_latency_shown_is_capture_to_display_in_every_bank_start_mode(comfy_server):
    rows = []
    for mode in MODES:
        session = "stage_latency"
        prompt = webcam_loop_prompt(session, "stage/latency", steps=STEPS, bank_start=mode)
        prompt_id = comfy_server.queue_prompt(prompt)
        camera, parts, status = asyncio.run(_measure(comfy_server, session, 5))
        comfy_server.wait(prompt_id, 60)
        assert status["replaced"] == 0 and not status["dropped"], status  # input k is the k-th frame sent
        lag = STEPS - 1 if mode == "continue, frames in flight" else 0
        shown, measured, by_position = [], [], []
        for headers, _, arrived in parts:
            k = int(headers["x-streamv2v-frame"]) - 1  # the output's ordinal: the answer to input k
            source = max(0, k - lag)  # the input whose pixels it holds (the engine's documented order)
            shown.append(arrived - float(headers["x-streamv2v-stamp"]))
            measured.append(arrived - camera.sent[source][1])
            by_position.append(arrived - camera.sent[k][1])  # what matching stamps by position gave
        assert shown == pytest.approx(measured, abs=1e-6), (mode, shown, measured)
        rows.append((mode, statistics.fmean(shown), statistics.fmean(measured), statistics.fmean(by_position)))
    print("\n| bank_start | latency shown (ms) | capture-to-display measured (ms) | stamps matched by position (ms) |")
    print("|---|---:|---:|---:|")
    for mode, shown, measured, positional in rows:
        print(f"| {mode} | {shown:.0f} | {measured:.0f} | {positional:.0f} |")
    in_flight = rows[-1]
    assert in_flight[1] > in_flight[3]  # frames in flight: the old position match understated it


def test_second_live_loop_for_a_running_session_is_refused_naming_it(comfy_server):
    session = "stage_single"
    first = comfy_server.queue_prompt(webcam_loop_prompt(session, "stage/single"))
    try:
        # queued (not yet running) or running: a second live loop on the session is refused either way
        with pytest.raises(PromptRejected) as refused:
            comfy_server.queue_prompt(webcam_loop_prompt(session, "stage/single_again"))
        text = json.dumps(refused.value.response)
        assert f"a loop is already queued or running on session '{session}'" in text, text
        (errors,) = [node["errors"] for node in refused.value.response["node_errors"].values()]
        assert [e["extra_info"]["input_name"] for e in errors] == ["session"]  # on the input at fault alone
        # a body the check cannot read goes on to ComfyUI's own handler, which answers it as ever
        junk = urllib.request.Request(f"{comfy_server.url}/prompt", data=b'{"prompt": [[[', method="POST")
        with pytest.raises(urllib.error.HTTPError) as answered:
            urllib.request.urlopen(junk, timeout=10)
        assert answered.value.code in (400, 500)
        # another session is fine (and is refused nothing)
        other = comfy_server.queue_prompt(webcam_loop_prompt("stage_other", "stage/other", idle_timeout=1.0))
    finally:
        deadline = time.monotonic() + 60
        while not get(comfy_server, f"/streamv2v/loop/{session}/status")["running"] and time.monotonic() < deadline:
            time.sleep(0.2)
        post(comfy_server, f"/streamv2v/loop/{session}/stop")
    comfy_server.wait(first, 60)
    comfy_server.wait(other, 60)
    assert "ended by idle_timeout" in comfy_server.log_text()


def test_hidden_file_is_not_validated_for_a_live_source(comfy_server):
    # the workflow switched to the browser webcam keeps its old file name: accepted, and never read
    prompt = webcam_loop_prompt("stage_file", "stage/file", file="video.mp4", idle_timeout=1.0)
    prompt_id = comfy_server.queue_prompt(prompt)
    comfy_server.wait(prompt_id, 60)
    # a file source still checks it, naming the input folder
    bad = loop_prompt("stage/file", file="video.mp4")
    with pytest.raises(PromptRejected, match="not in ComfyUI's input folder"):
        comfy_server.queue_prompt(bad)


def test_stage_page_is_served_standalone(comfy_server):
    with urllib.request.urlopen(f"{comfy_server.url}/streamv2v/stage/anything", timeout=10) as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
    assert "/mjpeg" in page and "scripts/app.js" not in page
    assert CONTENT_TYPE.startswith("multipart/x-mixed-replace")
