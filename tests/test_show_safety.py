"""A show that no request can end: hostile and careless requests sent to one running live loop on the real server.

One ComfyUI server, one live loop (tiny model with its CLIP, a DyMe bank with extended attention and feature
fusion, the browser-webcam source fed over HTTP). After each case the show is shown to go on (``goes_on``): the
loop still runs, its next frames are new, not black and changing, and its bank clears by name and fills again
(the loop reads the bank its name names). At the end the loop is stopped and its MP4 plays every frame it wrote.
Then what needs the loop stopped: a loop stopped before its first frame reports the change it never applied,
and schedules the parser does not fully understand are refused naming the line.
"""
import http.client
import io
import json
import threading
import re
import time

import numpy as np
import pytest
from PIL import Image

from host.clips import read_back
from host.prompts import webcam_loop_prompt
from host.server import PromptFailed
from host.waiting import wait_until
from test_loop_server import FRAME_HEADERS, JSON_HEADERS, rss_mib

SESSION, BANK = "show", "show_bank"
TALL = "\u9f98"  # 龘: 4,000 of them are 160 CLIP chunks


def show_prompt(session: str, prefix: str, **loop_inputs) -> dict:
    """Tiny checkpoint -> fault switch -> bank patches; CLIP text for both sides; the loop with the CLIP connected."""
    prompt = webcam_loop_prompt(session, prefix, steps=2, **loop_inputs)
    prompt.update({
        "20": {"class_type": "TinyFaultSwitch", "inputs": {"model": ["1", 0]}},
        "21": {"class_type": "FeatureBank", "inputs": {"name": BANK, "mode": "dyme", "size": 1, "interval": 1,
                                                       "seed": 0}},
        "22": {"class_type": "ExtendedAttentionPatch", "inputs": {"model": ["20", 0], "bank": ["21", 0],
                                                                  "blocks": "all"}},
        "23": {"class_type": "FeatureFusionPatch", "inputs": {"model": ["22", 0], "bank": ["21", 0], "alpha": 0.75,
                                                              "threshold": 0.9, "blocks": "low-res decoder"}},
        "24": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo"}},
    })
    prompt["3"]["inputs"].update(model=["23", 0], positive=["24", 0], negative=["24", 0], clip=["1", 1])
    return prompt


def send(server, method, path, body=b"", headers=None):
    """(status, JSON or text) of one request with exactly ``headers`` (Host included when given)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        given = dict(headers or {})
        connection.putrequest(method, path, skip_host="Host" in given)
        for name, value in {**given, "Content-Length": str(len(body))}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")


def params(server, body, headers=JSON_HEADERS, session=SESSION):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return send(server, "POST", f"/streamv2v/loop/{session}/params", data, headers)


def get(server, path):
    return send(server, "GET", path)[1]


def frame_jpeg(k: int) -> bytes:
    x = np.linspace(0, 6.283, 64)
    pattern = 0.5 + 0.5 * np.sin(x[None, :, None] * 2 + x[:, None, None] + 0.4 * k + np.array([0, 2, 4]))
    buffer = io.BytesIO()
    Image.fromarray((pattern * 255).astype(np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


class Feeder:
    """Posts a moving picture to the session's frame route, as a webcam would, until stopped."""

    def __init__(self, server, session):
        self.server, self.session, self.stopped = server, session, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        k = 0
        while not self.stopped.is_set():
            send(self.server, "POST", f"/streamv2v/webcam/{self.session}/frame", frame_jpeg(k), FRAME_HEADERS)
            k += 1
            time.sleep(0.03)


def output_image(server) -> np.ndarray:
    status, data = None, b""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", f"/streamv2v/webcam/{SESSION}/output")
    response = connection.getresponse()
    status, data = response.status, response.read()
    connection.close()
    assert status == 200, status
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def bank_status(server) -> dict:
    return {b["name"]: b for b in get(server, "/streamv2v/banks")["banks"]}[BANK]


def goes_on(server, frames: int = 3):
    """The loop still runs; its next frames are new, not black and changing; its bank clears by name and fills."""
    status = get(server, f"/streamv2v/loop/{SESSION}/status")
    assert status["running"], f"the show ended: {server.log_tail(30)}"
    done = status["frames_out"]
    images = []
    for k in range(1, frames + 1):
        wait_until(lambda: get(server, f"/streamv2v/loop/{SESSION}/status")["frames_out"] >= done + k, timeout=90,
                 what=f"output {done + k}", show=lambda: server.log_tail(20))
        images.append(output_image(server))
    assert all(image.mean() > 20 for image in images), [image.mean() for image in images]  # black: NaN went out
    assert np.abs(images[-1] - images[0]).max() > 8, "the output stopped following the video"
    code, answer = send(server, "POST", f"/streamv2v/banks/{BANK}/clear", b"{}", JSON_HEADERS)
    assert code == 200 and answer["status"]["last_reset"] == "cleared with the Clear bank button", answer
    wait_until(lambda: bank_status(server)["entries"] > 0, timeout=60, what="the loop to fill the bank it reads again")


@pytest.fixture(scope="module")
def show(comfy_server):
    """The running show: (server, prompt id); the feeder stops when the module ends."""
    send(comfy_server, "DELETE", f"/streamv2v/banks/{BANK}")
    prompt_id = comfy_server.queue_prompt(show_prompt(SESSION, "safety/show"))
    feeder = Feeder(comfy_server, SESSION)
    wait_until(lambda: get(comfy_server, f"/streamv2v/loop/{SESSION}/status")["running"], timeout=120,
             what="the show to start", show=lambda: comfy_server.log_tail(30))
    feeder.thread.start()
    try:
        yield comfy_server, prompt_id
    finally:
        feeder.stopped.set()
        send(comfy_server, "POST", f"/streamv2v/loop/{SESSION}/stop", b"{}", JSON_HEADERS)


def test_text_no_encoder_can_take_is_refused_before_the_answer(show):
    """Lone surrogates, control characters, weights that are not finite or bounded, nesting ComfyUI parses
    recursively: each a 400 naming the prompt, nothing queued (before: a 200, then the run ended at the frame)."""
    server, _ = show
    for text, message in [("abc \ud800 def", "prompt holds a character no text encoder can take"),
                          ("a\x1b[2Jb", "prompt holds the control character U+001B"),
                          ("(a watercolor painting:nan)", "the weight of '(a watercolor painting:nan)' is nan"),
                          ("(a photo:inf)", "is inf"), ("(a photo:1e308)", "is 1e+308"),
                          ("(" * 1900 + "a" + ")" * 1900, "prompt: the weight of")]:
        code, answer = params(server, {"prompt": text})
        assert code == 400 and message in answer["error"], (text[:40], code, answer)
    assert get(server, f"/streamv2v/loop/{SESSION}/params")["pending"] == 0
    goes_on(server)


def test_bodies_the_parser_cannot_take_are_a_400_and_applied_zeros_are_answered(show):
    server, _ = show
    code, answer = params(server, b"[" * 30_000)
    assert code == 400 and "nests too deeply" in answer["error"], (code, answer)  # before: a 500 RecursionError
    code, answer = params(server, b'{"blend_frames": 4, "x": "\xff"}')
    assert code == 400 and "not UTF-8" in answer["error"], answer
    code, answer = params(server, {"ff_alpha": 0, "blend_frames": 0})
    assert code == 200 and answer["accepted"] == {"blend_frames": 0, "ff_alpha": 0.0}, answer  # before: {}
    assert params(server, {"ff_alpha": 0.75, "blend_frames": 8})[0] == 200
    goes_on(server)


def test_the_worst_case_blend_costs_a_bounded_multiple_of_the_longer_prompt(show):
    """4,000 x '龘' (160 chunks), then 3,975 x '龘' (159 chunks) blended over 4 frames: their least common
    multiple would be 25,440 chunks (before: gigabytes, tens of seconds a frame; a stream batch holding both
    lengths ended the run). Peak RSS of the server while it blends stays within a few hundred MiB."""
    server, _ = show
    pid = server.proc.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark
    before = rss_mib(pid)
    changes = get(server, f"/streamv2v/loop/{SESSION}/params")["changes"]
    assert params(server, {"prompt": TALL * 4000, "blend_frames": 0})[0] == 200
    wait_until(lambda: get(server, f"/streamv2v/loop/{SESSION}/params")["changes"] > changes, timeout=90,
             what="prompt A to apply")
    assert params(server, {"prompt": TALL * 3975, "blend_frames": 4})[0] == 200
    goes_on(server, frames=4)  # the blend's frames
    peak = _peak_mib(pid)
    assert params(server, {"prompt": "a photo", "blend_frames": 0})[0] == 200
    print(f"\nworst-case blend: server RSS {before:.0f} MiB before, peak {peak:.0f} MiB while blending")
    assert peak - before < 400, (before, peak)


def _peak_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0


def test_a_flood_of_prompt_changes_is_coalesced_one_encode_a_frame(show):
    """200 prompts as fast as HTTP takes them: every one answered 200 (before: 429 after 16), at most one applied
    per frame, the others counted as superseded."""
    server, _ = show
    wait_until(lambda: get(server, f"/streamv2v/loop/{SESSION}/params")["pending"] == 0, timeout=60,
             what="the earlier change to apply")
    before = get(server, f"/streamv2v/loop/{SESSION}/params")
    frames_before = get(server, f"/streamv2v/loop/{SESSION}/status")["frames_out"]
    codes = [params(server, {"prompt": f"a watercolor painting {i}"})[0] for i in range(200)]
    assert codes == [200] * 200
    after = wait_until(lambda: (s := get(server, f"/streamv2v/loop/{SESSION}/params"))["current"]["prompt"] ==
                     "a watercolor painting 199" and s, timeout=60, what="the newest prompt to apply")
    frames = get(server, f"/streamv2v/loop/{SESSION}/status")["frames_out"] - frames_before
    applied = after["changes"] - before["changes"]
    assert 1 <= applied <= frames + 1 and after["superseded"] - before["superseded"] == 200 - applied
    print(f"\nflood: 200 prompts in {frames} frames -> {applied} applied (encoded), "
          f"{after['superseded'] - before['superseded']} superseded")
    goes_on(server)


def test_frames_that_come_out_not_finite_neither_blacken_the_show_nor_poison_the_bank(show):
    """Two model calls fed NaN (a broken model, an fp16 overflow): the show holds its last good frame, says so in
    the panel's log, clears the bank, and the next frames follow the video again (before: black until someone
    cleared the bank by hand)."""
    server, _ = show
    problems = get(server, f"/streamv2v/loop/{SESSION}/params")["problems"]
    assert send(server, "POST", "/streamv2v_test/fault", json.dumps({"nan_calls": 2}).encode(), JSON_HEADERS)[0] == 200
    wait_until(lambda: get(server, "/streamv2v_test/fault")["armed"] == 0, timeout=60, what="the spoiled calls")
    state = wait_until(lambda: (s := get(server, f"/streamv2v/loop/{SESSION}/params"))["problems"] > problems and s,
                     timeout=60, what="the panel to hear of it")
    assert "came out not finite (NaN/inf)" in [e for e in state["log"] if "problem" in e][-1]["problem"]
    assert re.search(rf"bank '{BANK}' cleared: input \d+ came out not finite", server.log_text())
    goes_on(server)


def test_the_running_loops_bank_stays_its_bank_after_free_memory(show):
    """POST /free clears the running loop's bank but keeps it under its name: clearing it by name (route, live
    clear_bank) clears what the loop reads, which fills again; deleting it is refused while the loop reads it
    (before: 404 after /free, and a live clear emptied a new bank the loop never read)."""
    server, _ = show
    server.free(unload_models=False, free_memory=True)
    assert BANK in {b["name"] for b in get(server, "/streamv2v/banks")["banks"]}
    code, answer = send(server, "DELETE", f"/streamv2v/banks/{BANK}")
    assert code == 409 and "read by a running loop" in answer["error"], answer
    changes = get(server, f"/streamv2v/loop/{SESSION}/params")["changes"]
    assert params(server, {"clear_bank": True})[0] == 200
    wait_until(lambda: get(server, f"/streamv2v/loop/{SESSION}/params")["changes"] > changes, timeout=60,
             what="the live clear")
    assert bank_status(server)["last_reset"].startswith("cleared live")
    goes_on(server)  # also: the route clears it, and the loop fills that same bank again


@pytest.mark.parametrize("case, headers", [
    ("Origin null (sandboxed iframe)", {"Origin": "null"}),
    ("a file:// page", {"Origin": "file://"}),
    ("a page on port 80 of the same host", {"Origin": "http://127.0.0.1"}),
    ("DNS rebinding", {"Host": "evil.example:{port}", "Origin": "http://evil.example:{port}"}),
    ("a text/plain body (no preflight)", {"Content-Type": "text/plain"}),
    ("Sec-Fetch-Site cross-site", {"Sec-Fetch-Site": "cross-site"}),
])
def test_cross_site_requests_cannot_steer_stop_or_feed_the_show(show, case, headers):
    """What ComfyUI's origin check lets through is refused by every state-changing route of the pack before it
    reads anything (403 / 415); the WebSocket handshake too. The loop goes on (a Stop got through before)."""
    server, _ = show
    headers = {k: v.format(port=server.port) for k, v in headers.items()}
    json_headers = {**JSON_HEADERS, **headers}
    frame_headers = {**FRAME_HEADERS, **headers}
    for method, path, body, sent in [
            ("POST", f"/streamv2v/loop/{SESSION}/params", b'{"ff_alpha": 0.1}', json_headers),
            ("POST", f"/streamv2v/loop/{SESSION}/stop", b"{}", json_headers),
            ("POST", f"/streamv2v/webcam/{SESSION}/frame", frame_jpeg(0), frame_headers),
            ("POST", f"/streamv2v/banks/{BANK}/clear", b"{}", json_headers),
            ("DELETE", f"/streamv2v/banks/{BANK}", b"", headers)]:
        if method == "DELETE" and "Content-Type" in headers:
            continue  # a DELETE is always preflighted by a browser: the body type does not matter
        code, answer = send(server, method, path, body, sent)
        assert code in (403, 415), (case, path, code, answer)
    if "Origin" in headers:
        code, _ = send(server, "GET", f"/streamv2v/webcam/{SESSION}/ws",
                       headers={**headers, "Connection": "Upgrade", "Upgrade": "websocket",
                                "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert code == 403, (case, code)
    assert get(server, f"/streamv2v/loop/{SESSION}/params")["current"]["ff_alpha"] != 0.1
    goes_on(server, frames=2)


def test_the_servers_own_page_and_plain_http_clients_still_steer(show):
    server, _ = show
    own = {**JSON_HEADERS, "Origin": f"http://127.0.0.1:{server.port}", "Sec-Fetch-Site": "same-origin"}
    assert params(server, {"ff_alpha": 0.7}, headers=own)[0] == 200
    assert params(server, {"ff_alpha": 0.75})[0] == 200  # curl: no Origin
    code, _ = send(server, "POST", f"/streamv2v/webcam/{SESSION}/frame", frame_jpeg(1),
                   {**FRAME_HEADERS, "Origin": f"http://localhost:{server.port}", "Host": f"localhost:{server.port}"})
    assert code == 200
    frame_without_header = {"Content-Type": "image/jpeg"}
    assert send(server, "POST", f"/streamv2v/webcam/{SESSION}/frame", frame_jpeg(1), frame_without_header)[0] == 415


def test_the_show_ends_only_when_stopped_and_its_mp4_plays(show):
    server, prompt_id = show
    goes_on(server, frames=2)
    assert send(server, "POST", f"/streamv2v/loop/{SESSION}/stop", b"{}", JSON_HEADERS)[0] == 200
    entry = server.wait(prompt_id, timeout=180)
    (video,) = [f for f in server.output_files(entry) if f.suffix == ".mp4"]
    (report,) = [line for line in server.log_text().splitlines() if "StreamV2V loop: wrote" in line and
                 "safety/show" in line]
    written = int(re.search(r"wrote (\d+) frames", report).group(1))
    # A live recording is constant-rate: each restyled frame at its capture time, held through gaps.
    seconds, fps = re.search(r"the MP4 holds ([\d.]+) s at ([\d.]+) fps", report).groups()
    played = len(read_back(video)[0])
    assert played >= written > 20 and abs(played - float(seconds) * float(fps)) <= 2, report
    encodes = int(re.search(r"(\d+) CLIP encodes", report).group(1))
    changes = int(re.search(r"(\d+) live changes", report).group(1))
    assert encodes <= changes and "superseded by a newer one" in report, report  # one encode per applied prompt
    assert "came out not finite (NaN/inf): each was replaced by the last good frame" in report, report


def test_changes_sent_before_the_first_frame_are_reported_as_discarded(comfy_server):
    """A loop stopped while it waited for its first frame lists the change it never applied (before: dropped
    silently)."""
    prompt_id = comfy_server.queue_prompt(show_prompt("early", "safety/early"))
    wait_until(lambda: get(comfy_server, "/streamv2v/loop/early/status")["running"], timeout=120, what="the loop")
    assert params(comfy_server, {"blend_frames": 3}, session="early")[0] == 200
    send(comfy_server, "POST", "/streamv2v/loop/early/stop", b"{}", JSON_HEADERS)
    comfy_server.wait(prompt_id, timeout=120)
    assert "discarded (the loop ended before a frame took it): blend frames 3" in comfy_server.log_text()


@pytest.mark.parametrize("schedule, message", [
    ('"0": "a photo" junk', "prompt schedule line 1: 'junk' after the quoted prompt is not understood"),
    ("0: a photo\n" + "7" * 5001 + ": oil", "prompt schedule line 2: the frame number has 5001 digits"),
    ("0: a photo\n8: (a photo:nan)", "prompt schedule line 2: the weight of '(a photo:nan)' is nan"),
    ("0: abc \ud800 def", "prompt schedule line 1 holds a character no text encoder can take"),
])
def test_schedules_the_parser_does_not_fully_understand_are_refused_naming_the_line(comfy_server, schedule, message):
    prompt = show_prompt("schedule", "safety/schedule", prompt_schedule=schedule)
    with pytest.raises(PromptFailed) as failed:
        comfy_server.run(prompt, timeout=120)
    assert message in str(failed.value), str(failed.value)[:400]


def test_the_guard_decides_from_headers_alone():
    """The guard's rule on cases a loopback test server cannot produce: a LAN address the connection came in on,
    IPv6, a published port (Host and Origin agree on it), names allowed for a proxy, ComfyUI's CORS origin."""
    import ipaddress

    from streamv2v.nodes.request_guard import check_headers

    lan = {ipaddress.ip_address("192.168.1.5")}

    def decide(host, origin=None, content="application/json", names=(), cors=None, site=None):
        result = check_headers(host, origin, site, content, False, "json", lan, set(names), cors)
        return result[0] if result else 200

    assert decide("192.168.1.5:8188", "http://192.168.1.5:8188") == 200
    assert decide("[::1]:8188", "http://[::1]:8188") == 200
    assert decide("localhost:9999", "http://localhost:9999") == 200  # docker -p 9999:8188
    assert decide("192.168.1.6:8188") == 403  # not an address of this server
    assert decide("studio.local:8188", "http://studio.local:8188") == 403
    assert decide("studio.local:8188", "http://studio.local:8188", names={"studio.local"}) == 200
    assert decide("pod.example", "https://pod.example", names={"pod.example"}) == 200  # TLS proxy, port 443
    assert decide("127.0.0.1:8188", "https://127.0.0.1:8188") == 200  # ComfyUI with TLS: only it holds that port
    assert decide("127.0.0.1:8188", "http://127.0.0.1:8188/") == 200
    assert decide("127.0.0.1:8188", "https://tools.example", cors="https://tools.example") == 200
    assert decide("127.0.0.1:8188", "http://127.0.0.1:8188", site="same-site") == 403
    assert decide("127.0.0.1:8188", content="application/x-www-form-urlencoded") == 415
    assert decide("127.0.0.1:notaport") == 403
