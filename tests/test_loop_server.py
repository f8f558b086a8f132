"""StreamV2VLoop in the real ComfyUI server: core video nodes around it, cancel, the live link under bad input,
and the server's memory with many session names."""
import asyncio
import fractions
import http.client
import io
import json
import os
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from host.clips import AUDIO_RATE, make_clip, read_back
from host.prompts import loop_prompt, webcam_loop_prompt
from host.server import PromptFailed, PromptRejected
from host.waiting import wait_until

FRAMES = 6
FEED_TIMEOUT_S = 240  # 98 frames through the tiny model, one at a time: about 15 s on an idle 2-core machine


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024.0


# What the pack's state-changing routes take (nodes/request_guard.py): frames as an image with the client header,
# everything else as JSON (a browser cannot send either cross-site without asking first).
FRAME_HEADERS = {"Content-Type": "image/jpeg", "X-StreamV2V-Client": "1"}
JSON_HEADERS = {"Content-Type": "application/json"}


def request(url, data=None, method=None, headers=None):
    """(status, body) of a request, also for error statuses; a POST carries the headers its route takes."""
    method = method or ("POST" if data is not None else "GET")
    if headers is None:
        headers = (FRAME_HEADERS if url.endswith("/frame") else JSON_HEADERS) if method == "POST" else {}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def core_video_prompt(clip: str, tag: str, first_id: int) -> dict:
    """LoadVideo -> StreamV2VLoop(video) -> SaveVideo, and -> GetVideoComponents -> CreateVideo -> SaveVideo."""
    n = [str(first_id + i) for i in range(6)]
    prompt = loop_prompt(f"core/{tag}_loop", video=[n[0], 0], width=64, height=64)
    loop = prompt.pop("3")
    prompt.update({
        n[0]: {"class_type": "LoadVideo", "inputs": {"file": clip}},
        n[1]: loop,
        n[2]: {"class_type": "SaveVideo", "inputs": {"video": [n[1], 3], "filename_prefix": f"core/{tag}_saved",
                                                      "format": "auto", "codec": "auto"}},
        n[3]: {"class_type": "GetVideoComponents", "inputs": {"video": [n[1], 3]}},
        n[4]: {"class_type": "CreateVideo", "inputs": {"images": [n[3], 0], "fps": [n[3], 2], "audio": [n[3], 1]}},
        n[5]: {"class_type": "SaveVideo", "inputs": {"video": [n[4], 0], "filename_prefix": f"core/{tag}_components",
                                                      "format": "auto", "codec": "auto"}},
    })
    return prompt


def test_core_video_nodes_around_the_loop(comfy_server):
    """Frames, frame rate (also 30000/1001) and audio survive LoadVideo -> loop -> SaveVideo / GetVideoComponents;
    re-queued unchanged, the loop is cached; an edit downstream re-runs only what changed."""
    rates = {"ntsc": fractions.Fraction(30000, 1001), "twelve": fractions.Fraction(12)}
    prompt = {}
    for i, (tag, rate) in enumerate(rates.items()):
        make_clip(comfy_server.input_dir / f"{tag}.mp4", frames=FRAMES, size=(72, 80), fps=rate)
        prompt.update(core_video_prompt(f"{tag}.mp4", tag, 10 + 10 * i))
    entry = comfy_server.run(prompt, timeout=300)
    files = {f.name.rsplit("_", 2)[0]: f for f in comfy_server.output_files(entry)}
    assert sorted(files) == sorted(f"{tag}_{kind}" for tag in rates for kind in ("loop", "saved", "components"))
    for tag, rate in rates.items():
        for kind in ("loop", "saved", "components"):
            frames, got_rate, samples, audio_rate = read_back(files[f"{tag}_{kind}"])
            assert frames.shape == (FRAMES, 64, 64, 3), (tag, kind)
            # CreateVideo takes the rate as a float and ComfyUI stores it to 1/1000 fps
            assert got_rate == rate if kind != "components" else abs(float(got_rate) - float(rate)) < 1e-3, (tag, kind)
            assert audio_rate == AUDIO_RATE and abs(len(samples) / AUDIO_RATE - FRAMES / float(rate)) < 0.1, (tag, kind)

    again = comfy_server.run(prompt, timeout=120)  # nothing changed: everything cached, no new file
    assert comfy_server.output_files(again) == [] or set(comfy_server.output_files(again)) <= set(files.values())
    prompt["12"]["inputs"]["filename_prefix"] = "core/ntsc_saved_again"  # the user edits one node
    edited = comfy_server.run(prompt, timeout=120)
    new = [f for f in comfy_server.output_files(edited) if f not in files.values()]
    assert [f.name.rsplit("_", 2)[0] for f in new] == ["ntsc_saved_again"]
    assert len(list((comfy_server.output_dir / "core").glob("*_loop_*.mp4"))) == 2  # the loops stayed cached


def test_cancelled_loop_reports_its_mp4_and_runs_again(comfy_server):
    make_clip(comfy_server.input_dir / "long.mp4", frames=80, fps=4, tone=False)  # a fragment every 4 frames
    prompt = loop_prompt("cancel/run", file="long.mp4")
    written = []
    for attempt in range(2):  # queued again after a cancel, the same prompt runs again (not cached)
        before = set((comfy_server.output_dir / "cancel").glob("*.mp4"))
        prompt_id = comfy_server.queue_prompt(prompt)
        path = wait_until(lambda: [p for p in (comfy_server.output_dir / "cancel").glob("*.mp4")
                                 if p not in before and p.stat().st_size > 2000], what="a growing MP4")[0]
        comfy_server.interrupt()
        entry = wait_until(lambda: comfy_server.history(prompt_id), what="the history entry")
        assert comfy_server.output_files(entry) == [path], entry  # history (and preview) keep the MP4
        frames, rate, _, _ = read_back(path)
        assert 4 <= frames.shape[0] < 80 and rate == 4
        written.append(path)
    assert written[0] != written[1]


async def _feed_live_loop(comfy_server, session, frames):
    """Send ``frames`` over the WebSocket, each after a "ready"; returns (stamps sent, (stamp, jpeg) received)."""
    import aiohttp

    url = f"ws://127.0.0.1:{comfy_server.port}/streamv2v/webcam/{session}/ws"
    sent, received = [], []
    deadline = time.monotonic() + FEED_TIMEOUT_S  # status messages keep coming even when frames stop
    async with aiohttp.ClientSession() as http_session, http_session.ws_connect(url) as ws:
        index = 0
        while index < len(frames) or len(received) < 20:
            try:
                message = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))  # 0 = none
            except asyncio.TimeoutError:
                raise AssertionError(f"after {FEED_TIMEOUT_S} s: {index} of {len(frames)} frames sent, "
                                     f"{len(received)} received (20 wanted)\n{comfy_server.log_tail(20)}") from None
            if message.type == aiohttp.WSMsgType.BINARY:
                received.append((np.frombuffer(message.data[:8], "<f8")[0], message.data[8:]))
            elif message.type == aiohttp.WSMsgType.TEXT and json.loads(message.data)["type"] == "ready":
                if index < len(frames):
                    stamp = 1000.0 + index
                    await ws.send_bytes(np.float64(stamp).astype("<f8").tobytes() + frames[index])
                    sent.append(stamp)
                    index += 1
            elif message.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"socket ended: {message}")
    return sent, received


def image_bytes(width, height, kind="JPEG", seed=0):
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // max(width, 1) + seed * 7) % 256, y * 255 // max(height, 1),
                    np.full_like(x, seed * 13 % 256)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, kind)
    return buffer.getvalue()


def test_live_loop_survives_bad_frames(comfy_server):
    """100 frames over the WebSocket with garbage, 4x4, 2000x2000 and 5000x5000 ones among them (and garbage over
    HTTP): the loop keeps its 64x64 size, writes every usable frame and reports the dropped ones."""
    session = "hardened"
    rng = np.random.default_rng(0)
    kinds = ["good"] * 82 + ["garbage"] * 8 + ["tiny"] * 3 + ["huge"] * 2 + ["too large"]
    rng.shuffle(kinds)
    kinds = ["good"] + kinds + ["good"]  # 98 over the WebSocket, 2 garbage posts over HTTP below
    jpeg = image_bytes(160, 120)
    frames = []
    for i, kind in enumerate(kinds):
        if kind == "good":
            frames.append(image_bytes(160, 120, seed=i))
        elif kind == "garbage":
            frames.append(rng.bytes(5000) if i % 2 else jpeg[:len(jpeg) // 3])
        elif kind == "tiny":
            frames.append(image_bytes(4, 4, "PNG"))
        elif kind == "huge":
            frames.append(image_bytes(2000, 2000, seed=i))
        else:
            frames.append(image_bytes(5000, 5000, "PNG"))
    usable = [1000.0 + i for i, kind in enumerate(kinds) if kind in ("good", "huge")]

    prompt_id = comfy_server.queue_prompt(webcam_loop_prompt(session, "live/hardened", steps=1))  # 1 step: quicker
    base = f"{comfy_server.url}/streamv2v"
    status = lambda: json.loads(request(f"{base}/loop/{session}/status")[1])  # noqa: E731
    try:
        wait_until(lambda: status()["running"], what="the loop to start")
        started = time.monotonic()
        sent, received = asyncio.run(_feed_live_loop(comfy_server, session, frames))
        for posted in range(2):  # a client posting garbage over HTTP is dropped the same way
            wait_until(lambda: status()["taken"] == len(sent) + posted, what=f"{len(sent) + posted} frames taken",
                     show=status)
            code, body = request(f"{base}/webcam/{session}/frame", b"\xff\xd8 truncated")
            assert code == 200 and json.loads(body)["accepted"]
        wait_until(lambda: status()["taken"] == 100, what="all frames taken", show=status)
        elapsed = time.monotonic() - started
    finally:
        request(f"{base}/loop/{session}/stop", b"")
    comfy_server.wait(prompt_id, timeout=120)
    final = status()
    assert final["dropped"] == {"undecodable": 10, "too small": 3, "too large": 1} and final["replaced"] == 0
    assert final["frames_out"] == len(usable) == 86
    (video,) = list((comfy_server.output_dir / "live").glob("hardened_*.mp4"))
    written, _, _, _ = read_back(video)
    # a constant-rate recording (30 fps): each frame at its arrival time, held until the next (two frames that
    # arrived within one slot, as this test's sender makes around a dropped frame: the newer one is kept)
    assert written.shape[1:] == (64, 64, 3) and len(written) >= 86
    stamps = [stamp for stamp, _ in received]
    assert stamps == sorted(stamps) and set(stamps) <= set(usable)  # each output carries its source's stamp
    assert Image.open(io.BytesIO(received[-1][1])).size == (64, 64)
    log = comfy_server.log_text()
    assert "wrote 86 frames (64x64)" in log and "dropped 14 live frames (1 too large, 3 too small, 10 undecodable)" in log
    assert "the MP4 holds" in log
    print(f"\nlive loop: 100 frames offered, 86 written at 64x64 in {elapsed:.1f} s "
          f"({86 / elapsed:.1f} fps through the tiny model), 14 dropped and reported")


def test_many_session_names_leave_server_memory_bounded(comfy_server):
    """2,000 + 2,000 posts of 231 KB frames to distinct session names: nothing is kept (no loop runs them)."""
    frame = np.random.default_rng(1).bytes(231 * 1024)
    pid = comfy_server.proc.pid
    connection = http.client.HTTPConnection("127.0.0.1", comfy_server.port, timeout=30)

    def post_many(first):
        for i in range(first, first + 2000):
            connection.request("POST", f"/streamv2v/webcam/name{i}/frame", body=frame, headers=FRAME_HEADERS)
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["accepted"] is False

    before = rss_mib(pid)
    post_many(0)
    middle = rss_mib(pid)
    post_many(2000)
    after = rss_mib(pid)
    connection.close()
    print(f"\nserver RSS: {before:.1f} MiB before, {middle:.1f} after 2,000 session names, {after:.1f} after 4,000 "
          f"(+{middle - before:.1f}, +{after - middle:.1f} MiB; bound +32 MiB each)")
    assert middle - before < 32 and after - middle < 32

    code, body = request(f"{comfy_server.url}/streamv2v/loop/{'x' * 65}/status")
    assert code == 400 and "is not allowed: use 1 to 64 letters" in json.loads(body)["error"]
    with pytest.raises(PromptRejected, match="is not allowed: use 1 to 64 letters"):  # refused when queued
        comfy_server.run(webcam_loop_prompt("x" * 10_000, "live/long_name"))


def test_stop_before_the_first_frame_ends_cleanly_and_idle_is_shown(comfy_server):
    import aiohttp

    session = "idle"
    prompt_id = comfy_server.queue_prompt(webcam_loop_prompt(session, "live/idle"))

    async def watch():
        url = f"ws://127.0.0.1:{comfy_server.port}/streamv2v/webcam/{session}/ws"
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http_session, http_session.ws_connect(url) as ws:
            while time.monotonic() < deadline:  # a browser that never sends: the status says how long nothing came
                message = json.loads((await ws.receive(timeout=max(0.1, deadline - time.monotonic()))).data)
                if message["type"] == "status" and (message["idle_s"] or 0) >= 2.5:
                    await ws.send_str(json.dumps({"type": "stop"}))
                    return message
        raise TimeoutError("the loop never ran, or its status never showed the idle time")

    try:
        status = asyncio.run(watch())
    finally:
        request(f"{comfy_server.url}/streamv2v/loop/{session}/stop", b"")
    assert status["running"] and status["frames_in"] == 0
    entry = comfy_server.wait(prompt_id, timeout=60)  # success, not an error
    assert comfy_server.output_files(entry) == []
    assert "stopped with the Stop button before the first frame: nothing written" in comfy_server.log_text()
    assert not os.path.exists(comfy_server.output_dir / "live" / "idle_00001_.mp4")


def test_every_input_and_output_has_a_tooltip(comfy_server):
    for node in ("StreamV2VLoop", "StreamV2VNextFrame", "StreamV2VWebcamEcho"):
        spec = comfy_server.object_info(node)[node]
        for group in ("required", "optional"):
            for name, value in spec["input"].get(group, {}).items():
                assert value[1].get("tooltip"), f"{node}.{name} has no tooltip"
        assert all(spec["output_tooltips"]), node
