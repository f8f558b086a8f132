"""StreamV2VLoop and StreamV2VNextFrame on the real ComfyUI (in-process, CPU) and the real server.

Clips are generated with PyAV in a temporary folder (64x64, a moving bar, a 440 Hz tone).
"""
import fractions
import json
import logging
import math
import os
import time
import urllib.request

import av
import numpy as np
import pytest
import torch

import comfy.model_management
import comfy.utils
import folder_paths
from host import tiny_models
from host.prompts import webcam_loop_prompt
from streamv2v.nodes import loop_nodes
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
from streamv2v.nodes.loop_nodes import CURSORS, StreamV2VLoop, StreamV2VNextFrame
from streamv2v.streamv2v_core import BANKS
from streamv2v.streamv2v_core.video_io import Mp4Writer

TONE_HZ, AUDIO_RATE = 440.0, 16000


def make_clip(path, frames=12, size=(64, 64), fps=12, tone=True):
    """An H.264 MP4 (or other container by suffix) of ``frames`` frames [H, W] with an AAC 440 Hz tone."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = size[1], size[0], "yuv420p"
        audio = out.add_stream("aac", rate=AUDIO_RATE) if tone else None
        if audio is not None:
            audio.layout = "mono"
        sample = 0
        for i in range(frames):
            img = np.full((size[0], size[1], 3), 40, np.uint8)
            img[:, (i * 5) % size[1]] = 230
            img[..., 2] = (i * 15) % 256
            out.mux(video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            if audio is not None:
                n = AUDIO_RATE // fps
                wave = 0.5 * np.sin(2 * np.pi * TONE_HZ * np.arange(sample, sample + n) / AUDIO_RATE)
                frame = av.AudioFrame.from_ndarray(wave.astype(np.float32)[None], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = AUDIO_RATE, sample
                sample += n
                out.mux(audio.encode(frame))
        out.mux(video.encode(None))
        if audio is not None:
            out.mux(audio.encode(None))
    return path


def read_back(path):
    """(frames [N, H, W, 3] uint8, average fps, audio samples mono float or None, audio rate)."""
    with av.open(str(path)) as c:
        rate = c.streams.video[0].average_rate
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    samples, audio_rate = None, None
    with av.open(str(path)) as c:
        if c.streams.audio:
            audio_rate = c.streams.audio[0].sample_rate
            samples = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    return frames, rate, samples, audio_rate


@pytest.fixture
def comfy_dirs(tmp_path):
    """ComfyUI's input and output folders pointed at tmp_path/input and tmp_path/output."""
    old_in, old_out = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    (tmp_path / "input").mkdir()
    (tmp_path / "output").mkdir()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    folder_paths.set_output_directory(str(tmp_path / "output"))
    yield tmp_path / "input", tmp_path / "output"
    folder_paths.set_input_directory(old_in)
    folder_paths.set_output_directory(old_out)
    CURSORS.reset()


@pytest.fixture(scope="module")
def parts():
    """A tiny SD1.5 model patched with a bank (EA + FF), conditioning, TAESD."""
    BANKS.remove("loop_test")
    handle = FeatureBankNode.execute("loop_test", "dyme", 1, 1, 0).args[0]
    model = tiny_models.tiny_sd15_model(0, out_scale=0.1)
    model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    cond = tiny_models.random_conditioning("sd15", 0)
    return dict(model=model, positive=cond, negative=cond, vae=tiny_models.tiny_taesd_vae(0)), handle


def run_loop(parts, **inputs):
    args = dict(source="video file", seed=0, steps=2, strength=0.5, cfg=1.0, stream_batch=True, fixed_noise=True,
                filename_prefix="loop_test/out")
    args.update(inputs)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return StreamV2VLoop.execute(**parts[0], **args).args


def test_file_to_file_keeps_frame_rate_and_audio(parts, comfy_dirs):
    inp, out = comfy_dirs
    make_clip(inp / "tone.mp4", frames=6, fps=6)
    path, last, count = run_loop(parts, path="tone.mp4")  # a name in the input folder, as core LoadVideo
    assert count == 6 and os.path.dirname(path).startswith(str(out)) and path.endswith(".mp4")
    assert last.shape == (1, 64, 64, 3)
    frames, rate, samples, audio_rate = read_back(path)
    assert frames.shape == (6, 64, 64, 3) and rate == 6
    assert audio_rate == AUDIO_RATE and abs(len(samples) / audio_rate - 1.0) < 0.1
    spectrum = np.abs(np.fft.rfft(samples[2048:2048 + 8192]))
    assert abs(np.argmax(spectrum) * AUDIO_RATE / 8192 - TONE_HZ) < 5


def test_skip_every_cap_resize_and_audio_span(parts, comfy_dirs):
    inp, _ = comfy_dirs
    make_clip(inp / "long.mp4", frames=24, size=(72, 80), fps=12)
    path, last, count = run_loop(parts, path=str(inp / "long.mp4"), skip_first=2, every_nth=3, max_frames=4,
                                 width=64, height=48)
    frames, rate, samples, audio_rate = read_back(path)
    assert count == 4 and frames.shape == (4, 48, 64, 3) and rate == 4  # 12 fps / 3
    assert abs(len(samples) / audio_rate - 1.0) < 0.1  # 4 frames at 4 fps, starting at 2/12 s


def test_cancel_after_k_frames_leaves_playable_mp4_with_k_frames(parts, comfy_dirs, monkeypatch):
    inp, out = comfy_dirs
    make_clip(inp / "c.mp4", frames=20, fps=10)
    k = 5
    monkeypatch.setattr(loop_nodes, "PREVIEW_INTERVAL_S", 0.0)  # a progress update per frame

    def hook(value, total, preview, node_id=None):
        if value == k:
            comfy.model_management.interrupt_current_processing()

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_loop(parts, path="c.mp4")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    (written,) = list((out / "loop_test").glob("*.mp4"))
    frames, rate, samples, _ = read_back(written)
    assert frames.shape[0] == k and rate == 10
    assert abs(len(samples) / AUDIO_RATE - k / 10) < 0.1


def test_bad_input_fails_before_work(parts, comfy_dirs):
    inp, out = comfy_dirs
    (inp / "notes.mp4").write_text("not a video")
    empty = Mp4Writer(str(inp / "empty.mp4"), 64, 64, fractions.Fraction(10))  # a video stream, no frames
    empty.container.start_encoding()
    empty.close()
    cases = [(dict(path="missing.mp4"), FileNotFoundError, "missing.mp4"),
             (dict(path="notes.mp4"), ValueError, "not a video"),
             (dict(path="empty.mp4"), ValueError, "no frames"),
             (dict(path=""), ValueError, "no path"),
             (dict(source="image folder", path=str(inp)), ValueError, "no images"),
             (dict(source="camera", camera_index=63), ValueError, "camera 63 did not open"),
             (dict(path="notes.mp4", width=4), ValueError, "too small")]
    for inputs, error, text in cases:
        with pytest.raises(error, match=text):
            run_loop(parts, **inputs)
    assert not list(out.rglob("*.mp4"))


def test_resolution_change_restarts_stream_resets_bank_and_keeps_writing(parts, comfy_dirs, caplog):
    inp, _ = comfy_dirs
    folder = inp / "frames"
    folder.mkdir()
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(6):
        size = (64, 64) if i < 3 else (96, 64)  # (w, h): frames 3.. are wider
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:03}.png")
    with caplog.at_level(logging.INFO, logger="streamv2v"):
        path, last, count = run_loop(parts, source="image folder", path="frames", fps=8)
    assert "frame size changed from 64x64 to 96x64 at frame 3" in caplog.text
    assert "bank 'loop_test' cleared: frame size changed 64x64 -> 96x64" in caplog.text
    frames, rate, _, _ = read_back(path)
    assert count == 6 and frames.shape == (6, 64, 64, 3) and rate == 8


def test_next_frame_cursor_advances_loops_and_resets(comfy_dirs):
    inp, _ = comfy_dirs
    make_clip(inp / "n.mp4", frames=7, fps=10, tone=False)
    args = dict(source="video file", path="n.mp4", skip_first=1, every_nth=2, cursor="t")
    assert math.isnan(StreamV2VNextFrame.fingerprint_inputs(**args))
    seen = [StreamV2VNextFrame.execute(**args).args for _ in range(4)]
    assert [s[1] for s in seen] == [0, 1, 2, 0] and all(s[2] == 3 for s in seen)  # frames 1, 3, 5, then loop
    assert seen[0][0].shape == (1, 64, 64, 3) and torch.equal(seen[0][0], seen[3][0])
    assert StreamV2VNextFrame.execute(**args).args[1] == 1
    assert StreamV2VNextFrame.execute(**args, reset=True).args[1] == 0
    StreamV2VNextFrame.execute(**args)
    StreamV2VNextFrame.execute(**args)
    with pytest.raises(ValueError, match="end of the source after 3 frames"):
        StreamV2VNextFrame.execute(**args, at_end="stop")
    CURSORS.reset("t")
    assert CURSORS.get("t") is None
    with pytest.raises(FileNotFoundError):
        StreamV2VNextFrame.execute(**{**args, "path": "gone.mp4"})


def _post(url, data=b"", method="POST"):
    request = urllib.request.Request(url, data=data if method == "POST" else None, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def test_server_browser_source_end_to_end(comfy_server):
    """The loop on the real server with the browser source: frames posted over HTTP, restyled ones read back."""
    info = comfy_server.object_info()
    for node in ("StreamV2VLoop", "StreamV2VNextFrame"):
        spec = info[node]["input"]
        for group in ("required", "optional"):
            for name, value in spec.get(group, {}).items():
                assert value[1].get("tooltip"), f"{node}.{name} has no tooltip"
    import cv2
    session = "srv_test"
    prompt = webcam_loop_prompt(session, "webcam/run")
    prompt_id = comfy_server.queue_prompt(prompt)
    base = f"{comfy_server.url}/streamv2v"
    frame = cv2.imencode(".jpg", np.full((120, 160, 3), 128, np.uint8))[1].tobytes()
    deadline, got = time.monotonic() + 60, 0
    while time.monotonic() < deadline and got < 3:
        _post(f"{base}/webcam/{session}/frame", frame)
        time.sleep(0.05)
        status, body = _post(f"{base}/webcam/{session}/output", method="GET")
        if status == 200:
            got = int(json.loads(_post(f"{base}/loop/{session}/status", method="GET")[1])["frames_out"])
    assert got >= 3, comfy_server.log_tail()
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)
    _post(f"{base}/loop/{session}/stop")
    entry = comfy_server.wait(prompt_id, timeout=60)
    (video,) = [f for f in comfy_server.output_files(entry) if f.suffix == ".mp4"]
    frames, _, samples, _ = read_back(video)
    assert frames.shape[0] >= got and frames.shape[1:] == (64, 64, 3) and samples is None
    assert json.loads(_post(f"{base}/loop/{session}/status", method="GET")[1])["running"] is False
