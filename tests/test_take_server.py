"""Playing a take live in the real server and re-rendering it: the same frames, the same changes at the same frames.

Frames are posted to the webcam route of a running loop (tiny checkpoint with its CLIP on the loop, 2 steps,
an OSC listener on a free loopback port). Mid-take a prompt change comes over the route, a seed and a strength
change and a preset recall come over OSC (python-osc's client). The loop records its take in the input folder;
a second prompt re-renders it with source 'take' at the take's own settings: the decoded MP4s agree within
2/255, with the same frame count and times. A third renders it at another size and step count.
"""
import json
import time

import av
import numpy as np
from pythonosc import udp_client

from host.prompts import loop_prompt
from host.server import free_port
from host.waiting import wait_until
from test_loop_server import image_bytes, request

SESSION, FRAMES = "take_test", 10
SETTINGS = {"width": 64, "height": 64, "steps": 2, "seed": 3, "strength": 0.5}


def prompt(prefix, **inputs):
    """Tiny checkpoint (its CLIP on the loop) -> StreamV2VLoop of the session, the take's settings unless given."""
    return loop_prompt(prefix, session=SESSION, clip=["1", 1], **{**SETTINGS, **inputs})


def status(server, what="status"):
    return json.loads(request(f"{server.url}/streamv2v/loop/{SESSION}/{what}")[1])


def decoded(path):
    with av.open(str(path)) as container:
        frames = [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    return [p for p, _ in frames], np.stack([a for _, a in frames]).astype(np.int16)


def play_take(server, osc_port) -> tuple[dict, list]:
    """A live take: frames one by one, a route change, OSC changes and an OSC preset recall mid-take."""
    base = f"{server.url}/streamv2v/loop/{SESSION}"
    prompt_id = server.queue_prompt(prompt("take/live", source="browser webcam", osc_port=osc_port))
    wait_until(lambda: status(server)["running"], what="the loop to start")
    for body, want, message in [({"presets": [{"strength": 3}]}, 400, "preset 1: strength must be a number"),
                                ({"presets": [None] * 9}, 400, "at most 8"), ({"x": 1}, 400, 'send {"presets"')]:
        code, answer = request(f"{base}/presets", json.dumps(body).encode())
        assert code == want and message in json.loads(answer)["error"], answer
    assert request(f"{server.url}/streamv2v/loop/nobody_here/presets", b'{"presets": []}')[0] == 404
    code, _ = request(f"{base}/presets", json.dumps({"presets": [{"strength": 0.45, "seed": 11}]}).encode())
    assert code == 200
    osc = udp_client.SimpleUDPClient("127.0.0.1", osc_port)
    changes = {3: lambda: request(f"{base}/params", json.dumps({"prompt": "oil painting", "blend_frames": 2}).encode()),
               5: lambda: (osc.send_message(f"/streamv2v/{SESSION}/seed", 9),
                           osc.send_message(f"/streamv2v/{SESSION}/strength", 0.6)),
               7: lambda: osc.send_message(f"/streamv2v/{SESSION}/preset", 1)}
    try:
        for i in range(FRAMES):
            if i in changes:
                before = status(server, "params")["changes"]
                changes[i]()
                wait_until(lambda: status(server, "params")["pending"] > 0 or status(server, "params")["changes"]
                           > before, what=f"the change before frame {i} to arrive")
            request(f"{server.url}/streamv2v/webcam/{SESSION}/frame", image_bytes(64, 64, seed=i))
            wait_until(lambda: status(server)["taken"] == i + 1, what=f"frame {i} to be taken")
        wait_until(lambda: status(server, "params")["pending"] == 0, what="every change applied")
        log = status(server, "params")["log"]
    finally:
        request(f"{base}/stop", b"")
    return server.wait(prompt_id, timeout=300), log


def test_a_take_re_rendered_at_its_own_settings_gives_the_live_take(comfy_server):
    entry, log = play_take(comfy_server, free_port())
    texts = [e["change"] for e in log]
    assert texts[0] == "prompt 'oil painting' (blend 2 frames)" and "seed 9" in " ".join(texts)
    assert "strength 0.6" in " ".join(texts) and texts[-1] == "preset 1: seed 11, strength 0.45"
    (live,) = [f for f in comfy_server.output_files(entry) if f.suffix == ".mp4"]
    report = comfy_server.log_text()
    assert "OSC on 127.0.0.1:" in report and "accepted" in report
    takes = sorted(p.name for p in comfy_server.input_dir.iterdir() if p.name.startswith(f"streamv2v-take-{SESSION}"))
    take = takes[-1]
    assert f"take recorded in the input folder: {take}/ ({FRAMES} frames, {len(log)} live changes)" in report
    assert (comfy_server.input_dir / take / "prompt_schedule.txt").read_text() == f"{log[0]['frame']}: oil painting\n"
    again = comfy_server.run(prompt("take/again", source="take", file=f"{take}/"), timeout=300)
    (render,) = [f for f in comfy_server.output_files(again) if f.suffix == ".mp4"]
    live_pts, live_frames = decoded(live)
    render_pts, render_frames = decoded(render)
    # constant frame rate: each of the FRAMES outputs at its capture time, held until the next; the re-render
    # places the take's frames at their recorded arrival times on the same grid
    assert len(live_pts) >= FRAMES and render_pts == live_pts
    worst = int(np.abs(live_frames - render_frames).max())
    print(f"\ntake re-rendered at its own settings: {FRAMES} frames ({len(live_pts)} at 30 fps), same times, "
          f"largest difference {worst}/255")
    assert worst <= 2
    larger = comfy_server.run(prompt("take/larger", source="take", file=f"{take}/", width=96, height=96, steps=3),
                              timeout=300)
    (big,) = [f for f in comfy_server.output_files(larger) if f.suffix == ".mp4"]
    big_pts, big_frames = decoded(big)
    assert big_pts == live_pts and big_frames.shape == (len(live_pts), 96, 96, 3)
