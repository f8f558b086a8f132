"""StreamV2VLoop and StreamV2VNextFrame on the real ComfyUI, in-process (CPU).

Clips are generated with PyAV in a temporary folder (64x64, a moving bar, a 440 Hz tone).
The real server's side (core video nodes, the webcam link, memory) is in test_loop_server.py.
"""
import fractions
import hashlib
import logging
import math
import os

import av
import numpy as np
import pytest
import torch

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import InputImpl, Types
from comfy_execution.graph_utils import ExecutionBlocker
from host import tiny_models
from host.clips import AUDIO_RATE, TONE_HZ, make_clip, read_back
from streamv2v.nodes import node_status
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
from streamv2v.nodes.loop.cursors import CURSORS
from streamv2v.nodes.loop.node import StreamV2VLoop
from streamv2v.nodes.loop.next_frame import StreamV2VNextFrame
from streamv2v.streamv2v_core import BANKS
from streamv2v.streamv2v_core.media.mp4_writer import Mp4Writer


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
    """The loop's NodeOutput (args: video_path, last_frame, frames, video, report)."""
    args = dict(source="video file", seed=0, steps=2, strength=0.5, cfg=1.0, stream_batch=True, fixed_noise=True,
                filename_prefix="loop_test/out")
    args.update(inputs)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return StreamV2VLoop.execute(**parts[0], **args)


def test_file_to_file_keeps_frame_rate_and_audio_and_gives_a_video(parts, comfy_dirs):
    inp, out = comfy_dirs
    make_clip(inp / "tone.mp4", frames=4, fps=4)
    result = run_loop(parts, file="tone.mp4")  # a name in the input folder, as core LoadVideo takes it
    path, last, count, video, report = result.args
    assert count == 4 and os.path.dirname(path).startswith(str(out)) and path.endswith(".mp4")
    assert last.shape == (1, 64, 64, 3) and report.startswith("wrote 4 frames (64x64)") and "WARNING" not in report
    assert result.ui.as_dict()["images"][0]["filename"] == os.path.basename(path)
    frames, rate, samples, audio_rate = read_back(path)
    assert frames.shape == (4, 64, 64, 3) and rate == 4
    assert audio_rate == AUDIO_RATE and abs(len(samples) / audio_rate - 1.0) < 0.1
    spectrum = np.abs(np.fft.rfft(samples[2048:2048 + 8192]))
    assert abs(np.argmax(spectrum) * AUDIO_RATE / 8192 - TONE_HZ) < 5
    components = video.get_components()  # the VIDEO output is the MP4 written
    assert components.images.shape == (4, 64, 64, 3) and components.frame_rate == 4


def test_skip_every_cap_resize_and_audio_span(parts, comfy_dirs):
    inp, _ = comfy_dirs
    make_clip(inp / "long.mp4", frames=24, size=(72, 80), fps=12)
    path, last, count, _, _ = run_loop(parts, file="long.mp4", skip_first=2, every_nth=3, max_frames=4,
                                       width=64, height=48).args
    frames, rate, samples, audio_rate = read_back(path)
    assert count == 4 and frames.shape == (4, 48, 64, 3) and rate == 4  # 12 fps / 3
    assert abs(len(samples) / audio_rate - 1.0) < 0.1  # 4 frames at 4 fps, starting at 2/12 s


class NeverMaterialized(InputImpl.VideoFromFile):
    """A core VideoFromFile that fails if anything loads it whole: the loop must stream it."""

    def get_components(self):
        raise AssertionError("the loop loaded the whole video")


def test_video_input_streams_a_file_and_reads_an_in_memory_video(parts, comfy_dirs):
    inp, _ = comfy_dirs
    make_clip(inp / "ntsc.mp4", frames=3, fps=fractions.Fraction(30000, 1001))
    path, _, count, video, _ = run_loop(parts, video=NeverMaterialized(str(inp / "ntsc.mp4"))).args
    frames, rate, samples, _ = read_back(path)
    assert count == 3 and frames.shape[0] == 3 and rate == fractions.Fraction(30000, 1001) and samples is not None
    assert video.get_frame_rate() == fractions.Fraction(30000, 1001)

    images = torch.rand(4, 48, 64, 3)  # as core CreateVideo gives it: frames and a waveform in memory
    wave = torch.sin(2 * math.pi * TONE_HZ * torch.arange(AUDIO_RATE) / AUDIO_RATE)[None, None]
    in_memory = InputImpl.VideoFromComponents(Types.VideoComponents(
        images=images, audio={"waveform": wave, "sample_rate": AUDIO_RATE}, frame_rate=fractions.Fraction(4)))
    path, _, count, _, _ = run_loop(parts, video=in_memory).args
    frames, rate, samples, audio_rate = read_back(path)
    assert count == 4 and frames.shape == (4, 48, 64, 3) and rate == 4
    assert audio_rate == AUDIO_RATE and abs(len(samples) / AUDIO_RATE - 1.0) < 0.1

    with pytest.raises(ValueError, match="a VIDEO is connected but source is 'camera'"):
        run_loop(parts, video=in_memory, source="camera")


def test_cancel_keeps_and_reports_the_mp4(parts, comfy_dirs, monkeypatch):
    """Cancel after k frames: the MP4 is playable with k frames and the node still reports it (history, preview);
    nothing downstream runs and the cancel goes on to the rest of the prompt."""
    inp, out = comfy_dirs
    make_clip(inp / "c.mp4", frames=20, fps=10)
    k = 5
    monkeypatch.setattr(node_status, "PREVIEW_INTERVAL_S", 0.0)  # a progress update per frame

    def hook(value, total, preview, node_id=None):
        if value == k:
            comfy.model_management.interrupt_current_processing()

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        result = run_loop(parts, file="c.mp4")
        assert comfy.model_management.processing_interrupted()  # passed on to the rest of the prompt
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert all(isinstance(value, ExecutionBlocker) for value in result.args)
    (written,) = list((out / "loop_test").glob("*.mp4"))
    assert result.ui.as_dict()["images"][0]["filename"] == written.name
    frames, rate, samples, _ = read_back(written)
    assert frames.shape[0] == k and rate == 10
    assert abs(len(samples) / AUDIO_RATE - k / 10) < 0.1


def test_a_live_frame_taken_just_before_stop_is_still_written():
    """Stop pressed while the loop decodes the frame it just took from the session: that frame is given on (the
    session counted it as taken; dropping it wrote fewer frames than taken with none reported dropped), and
    nothing is read after it."""
    from streamv2v.nodes.loop.sources import FramePick, FrameStream
    from streamv2v.streamv2v_core.live.session import BrowserSession
    from streamv2v.streamv2v_core.stream.frame import Frame

    session = BrowserSession("stop-race")
    session.start()
    read = []

    def reader():
        for i in range(5):
            if i == 2:
                session.stop()  # arrives while frame 2, already taken, is decoded
            read.append(i)
            yield Frame(torch.full((8, 8, 3), i / 10.0), stamp=float(i))

    pick = FramePick()
    stream = FrameStream(reader(), pick, pick.sizer(), session)
    assert [frame.stamp for frame in stream] == [0.0, 1.0, 2.0] and read == [0, 1, 2]
    assert stream.stopped and stream.read == 3


def test_bad_input_fails_before_work(parts, comfy_dirs, tmp_path):
    inp, out = comfy_dirs
    (inp / "notes.mp4").write_text("not a video")
    empty = Mp4Writer(str(inp / "empty.mp4"), 64, 64, fractions.Fraction(10))  # a video stream, no frames
    empty.container.start_encoding()
    empty.close()
    make_clip(tmp_path / "outside.mp4", frames=2)
    os.mkfifo(inp / "pipe.mp4")  # reading it would block: the refusals below prove nothing is opened
    os.symlink(tmp_path / "outside.mp4", inp / "link.mp4")
    outside = "is outside ComfyUI's input folder"
    cases = [(dict(file="missing.mp4"), FileNotFoundError, "missing.mp4"),
             (dict(file="notes.mp4"), ValueError, "not a video"),
             (dict(file="empty.mp4"), ValueError, "no frames"),
             (dict(file=""), ValueError, "no file chosen"),
             (dict(file=str(tmp_path / "outside.mp4")), ValueError, outside),
             (dict(file="../outside.mp4"), ValueError, outside),
             (dict(file="link.mp4"), ValueError, outside),
             (dict(file="../input/../outside.mp4 [input]"), ValueError, outside),
             (dict(file="pipe.mp4", filename_prefix="z\x00q"), ValueError, r"contains '\\x00'"),
             (dict(file="pipe.mp4", filename_prefix=""), ValueError, "filename_prefix is empty"),
             (dict(file="pipe.mp4", filename_prefix="a/../b"), ValueError, "cannot be a folder or file name"),
             (dict(file="pipe.mp4", session="x" * 10_000), ValueError, "session name 'xxx"),
             (dict(source="image folder", file="."), ValueError, "no images"),
             (dict(source="camera", camera_index=63), ValueError, "camera 63 did not open"),
             (dict(file="pipe.mp4", width=4), ValueError, "too small")]
    for inputs, error, text in cases:
        with pytest.raises(error, match=text):
            run_loop(parts, **inputs)
    assert not list(out.rglob("*")), "bad input left a file behind"
    problems = {name: StreamV2VLoop.validate_inputs(file=name) for name in ("../outside.mp4", "gone.mp4")}
    assert outside in problems["../outside.mp4"] and "not in ComfyUI's input folder" in problems["gone.mp4"]
    assert outside in StreamV2VLoop.validate_inputs(file="../x")  # refused whatever the source
    assert StreamV2VLoop.validate_inputs(file="") is True


def test_new_runs_never_overwrite_earlier_output(parts, comfy_dirs):
    inp, out = comfy_dirs
    make_clip(inp / "a.mp4", frames=2, fps=4, tone=False)
    first = run_loop(parts, file="a.mp4", filename_prefix="same").args[0]
    digest = hashlib.sha256(open(first, "rb").read()).hexdigest()
    second = run_loop(parts, file="a.mp4", filename_prefix="same").args[0]
    assert first != second and hashlib.sha256(open(first, "rb").read()).hexdigest() == digest


def test_truncated_source_warns_in_log_and_report(parts, comfy_dirs, caplog):
    """An MP4 that declares 40 frames but holds 4: the run keeps them and says the source ended early."""
    inp, _ = comfy_dirs
    make_clip(inp / "full.mp4", frames=40, fps=10, tone=False, faststart=True)
    data = (inp / "full.mp4").read_bytes()
    with av.open(str(inp / "full.mp4")) as container:
        cut = [p.pos for p in container.demux(video=0) if p.pos is not None and p.pos > 0][5]
    (inp / "cut.mp4").write_bytes(data[:cut])
    with caplog.at_level(logging.WARNING, logger="streamv2v"):
        _, _, count, _, report = run_loop(parts, file="cut.mp4").args
    assert 0 < count < 40
    assert f"declares 40 frames but only {count} could be read" in report and report.count("WARNING") == 1
    assert "it may be truncated" in caplog.text


def test_image_folder_skips_unreadable_images_and_scales_odd_sizes(parts, comfy_dirs, caplog):
    inp, _ = comfy_dirs
    folder = inp / "frames"
    folder.mkdir()
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(6):
        size = (64, 64) if i < 3 else (96, 64)  # (w, h): frames 3.. are wider
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:03}.png")
    (folder / "002b.png").write_bytes(b"\x89PNG broken")
    with caplog.at_level(logging.INFO, logger="streamv2v"):
        path, _, count, _, report = run_loop(parts, source="image folder", file="frames/", fps=8).args
    frames, rate, _, _ = read_back(path)
    assert count == 6 and frames.shape == (6, 64, 64, 3) and rate == 8
    assert "skipped 1 image that could not be used: 002b.png (" in report and "WARNING" not in report
    assert "3 frames of another size scaled to 64x64" in report
    assert "frame size changed" not in caplog.text  # one stream, one size: the bank goes on through the run
    assert BANKS.find(parts[1].name).status()["frames_seen"] == 6  # bank_start "fresh": this run's six frames


def test_next_frame_cursor_advances_batches_loops_and_resets(comfy_dirs):
    inp, _ = comfy_dirs
    make_clip(inp / "n.mp4", frames=7, fps=10, tone=False)
    args = dict(source="video file", file="n.mp4", skip_first=1, every_nth=2, cursor="t")
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
    batch, index, total = StreamV2VNextFrame.execute(**args, count=2, reset=True).args  # Auto Queue meta-batches
    assert batch.shape == (2, 64, 64, 3) and index == 0 and torch.equal(batch[0], seen[0][0][0])
    batch, index, _ = StreamV2VNextFrame.execute(**args, count=2).args
    assert batch.shape[0] == 1 and index == 2  # up to count: the rest of the source
    CURSORS.reset("t")
    assert len(CURSORS) == 0
    with pytest.raises(FileNotFoundError):
        StreamV2VNextFrame.execute(**{**args, "file": "gone.mp4"})
    with pytest.raises(ValueError, match="outside ComfyUI's input folder"):
        StreamV2VNextFrame.execute(**{**args, "file": "/etc/hostname"})


def test_the_report_counts_the_frames_the_similarity_filter_skipped(parts, comfy_dirs):
    inp, _ = comfy_dirs
    folder = inp / "still"
    folder.mkdir()
    from PIL import Image
    still = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for i in range(5):
        Image.fromarray(still).save(folder / f"{i:03}.png")
    _, _, count, _, report = run_loop(parts, source="image folder", file="still/", similarity_filter=True,
                                      similarity_threshold=0.5).args
    assert count == 5 and "the similarity filter reused the previous output for 4 frames" in report


def test_next_frame_past_the_end_says_to_lower_skip_first(comfy_dirs):
    inp, _ = comfy_dirs
    make_clip(inp / "short.mp4", frames=3, fps=10, tone=False)
    with pytest.raises(ValueError, match=r"no frames left after skipping 100 frames \(every frame kept\): lower "
                                         r"skip_first") as raised:
        StreamV2VNextFrame.execute(source="video file", file="short.mp4", skip_first=100, cursor="past", at_end="loop")
    assert "at_end" not in str(raised.value)
