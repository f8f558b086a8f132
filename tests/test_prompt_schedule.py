"""Keyframed prompt schedules and weight-free ControlNet hints (streamv2v_core/stream/prompt_schedule.py,
media/hints.py)."""
import cv2
import numpy as np
import pytest
import torch

from streamv2v.streamv2v_core.media import hints
from streamv2v.streamv2v_core.stream.prompt_schedule import (Keyframe, blend_entry, blend_position, lerp_tokens,
                                                      parse_schedule)


def test_schedule_formats():
    """The plain 'frame: prompt' lines, and FizzNodes' quoted JSON-like text; prompts keep their commas."""
    assert parse_schedule("0: watercolor, soft light\n120: oil painting,\n") == [
        Keyframe(0, "watercolor, soft light"), Keyframe(120, "oil painting")]
    fizz = '{"0" :"A cat, sitting", "12" :"A \\"dog\\"",\n"30": "x"}'
    assert parse_schedule(fizz) == [Keyframe(0, "A cat, sitting"), Keyframe(12, 'A "dog"'), Keyframe(30, "x")]
    assert parse_schedule("30: late\n0: early") == [Keyframe(0, "early"), Keyframe(30, "late")]
    assert parse_schedule("  \n") == []


@pytest.mark.parametrize("text, message", [
    ("watercolor", "line 1: 'watercolor' is not 'frame: prompt'"),
    ("0: a\n0: b", "line 2: frame 0 is given twice"),
    ("0: a\n5:", "line 2: frame 5 has no prompt"),
    ("0: " + "x" * 5000, "at most 4000"),
    ("\n".join(f"{i}: p" for i in range(300)), "more than 256 keyframes"),
])
def test_schedule_errors_name_the_line(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_schedule(text)


def test_blend_positions():
    keys = [Keyframe(10, "a"), Keyframe(20, "b"), Keyframe(30, "c")]
    assert blend_position(keys, 0) == (0, 0, 0.0)      # before the first: the first prompt
    assert blend_position(keys, 10) == (0, 0, 0.0)
    assert blend_position(keys, 15) == (0, 1, 0.5)
    assert blend_position(keys, 29) == (1, 2, pytest.approx(0.9))
    assert blend_position(keys, 30) == (2, 2, 0.0)
    assert blend_position(keys, 10_000) == (2, 2, 0.0)  # after the last: the last prompt


def test_blend_entry_is_linear_and_leaves_inputs_alone():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(1, 77, 8, generator=g), {"pooled_output": torch.randn(1, 8, generator=g), "tag": "a"}]
    b = [torch.randn(1, 77, 8, generator=g), {"pooled_output": torch.randn(1, 8, generator=g), "tag": "b"}]
    copies = [t.clone() for t in (a[0], a[1]["pooled_output"], b[0], b[1]["pooled_output"])]
    mid = blend_entry(a, b, 0.25)
    assert torch.allclose(mid[0], 0.75 * a[0] + 0.25 * b[0])
    assert torch.allclose(mid[1]["pooled_output"], 0.75 * a[1]["pooled_output"] + 0.25 * b[1]["pooled_output"])
    assert mid[1]["tag"] == "a" and blend_entry(a, b, 0.75)[1]["tag"] == "b"
    assert blend_entry(a, b, 0.0)[0] is a[0] and blend_entry(a, b, 1.0)[0] is b[0]
    assert blend_entry(a, b, 1.0)[1] is not b[1]  # a new dict: the caller may change it
    for before, now in zip(copies, (a[0], a[1]["pooled_output"], b[0], b[1]["pooled_output"])):
        assert torch.equal(before, now)


def test_long_prompts_blend_through_their_common_length():
    """77 and 154 tokens: each repeated to 154 (as ComfyUI batches them), which keeps attention unchanged."""
    a, b = torch.ones(1, 77, 4), torch.zeros(1, 154, 4)
    mixed = lerp_tokens(a, b, 0.5)
    assert mixed.shape == (1, 154, 4) and torch.allclose(mixed, torch.full_like(mixed, 0.5))


def test_canny_is_opencvs_on_the_grey_frame():
    rng = np.random.default_rng(0)
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[8:24, 12:36] = 255  # a white box: edges on its border
    pixels[0:4] = rng.integers(0, 255, (4, 48, 3))
    frame = torch.from_numpy(pixels.astype(np.float32) / 255)
    hint = hints.canny(frame)
    expected = cv2.Canny(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY), 100, 200)
    assert hint.shape == (1, 32, 48, 3) and hint.dtype == torch.float32
    assert torch.equal(hint[0, :, :, 0], torch.from_numpy(expected / 255.0).float())
    assert torch.equal(hint[0, :, :, 0], hint[0, :, :, 2]) and hint[0, 7:9, 20, 0].max() == 1 \
        and hint[0, 16, 20, 0] == 0
    with pytest.raises(ValueError, match="low <= high"):
        hints.canny(frame, 200, 100)


def test_frame_and_previous_output_hints():
    frame = torch.rand(16, 16, 3)
    own = hints.as_hint(frame)
    assert own.shape == (1, 16, 16, 3) and torch.equal(own[0], frame)
    own.zero_()
    assert frame.abs().sum() > 0  # a copy: the hint never aliases the frame the engine encodes
    previous = hints.PreviousOutput()
    assert torch.equal(previous(frame)[0], frame)  # nothing finished yet: the frame itself
    out = torch.rand(16, 16, 3)
    previous.saw(out)
    assert torch.equal(previous(frame)[0], out)
    assert torch.equal(previous(torch.zeros(8, 8, 3))[0], torch.zeros(8, 8, 3))  # another size: the frame itself
