"""Keyframed prompt schedules, what a prompt's text may hold, and weight-free ControlNet hints
(streamv2v_core/stream/prompt_schedule.py, prompt_text.py, media/hints.py)."""
import random
import re

import cv2
import numpy as np
import pytest
import torch

from streamv2v.streamv2v_core.media import hints
from streamv2v.streamv2v_core.stream.prompt_schedule import (Keyframe, blend_entry, blend_position, common_length,
                                                             lerp_tokens, parse_schedule)
from streamv2v.streamv2v_core.stream.prompt_text import check_prompt, prompt_weights


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


@pytest.mark.parametrize("text, message", [
    ('"0": "a photo" junk', "line 1: 'junk' after the quoted prompt is not understood"),
    ("0: a\n" + "9" * 5001 + ": b", "line 2: the frame number has 5001 digits, past the last possible frame"),
    ('0: a photo" junk', "line 1: the prompt 'a photo\" junk' holds a quote but is not quoted"),
    ('"0": "a photo', "line 1: the quoted prompt '\"a photo' is not closed"),
    ("0: a\n10: abc \ud800 def", "line 2 holds a character no text encoder can take (a lone surrogate U+D800"),
    ("0: a\x07b", "line 1 holds the control character U+0007"),
    ("0: a\n4: (a photo:nan)", "line 2: the weight of '(a photo:nan)' is nan"),
    ("0: (a photo:1e308)", "line 1: the weight of '(a photo:1e308)' is 1e+308"),
    ("0: " + "(" * 40 + "a" + ":1)" * 40, "line 1: parentheses nest more than 32 deep"),  # ComfyUI: recursion
    ("0: " + "(" * 25 + "a" + ")" * 25, "line 1: the weight of '(a)' is 10.83"),  # 1.1 ** 25
])
def test_schedule_refuses_what_it_does_not_fully_understand(text, message):
    """Junk after a quoted prompt, a frame number of thousands of digits, stray or unclosed quotes, text no text
    encoder can take, weights that are not finite or bounded: each refused, naming the line (before any work)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_schedule(text)


def test_prompt_weights_are_read_as_comfyui_reads_them():
    """The weights prompt_text finds are those ComfyUI's tokenizer applies (comfy/sd1_clip.py token_weights), on
    ComfyUI's own examples and on random texts of parentheses, colons, numbers and escapes."""
    from comfy.sd1_clip import escape_important, token_weights

    def comfy_weights(text):
        return {w for _, w in token_weights(escape_important(text), 1.0)} - {1.0}

    examples = ["(foo)", "(foo)(bar)", "(foo:2.0)", "((foo))", "((foo):1.1)", "((foo:1.1))", "(foo:0.0)",
                "foo ((((lol (cat:666) attack:100)))) baz", "a \\(b:3\\) c", "x) (y:2", "(a:2) b) (c:3)", "(:5)"]
    rng = random.Random(0)
    alphabet = ["(", ")", ":", "1.5", "2", "a", " ", "\\(", "\\)", "0.5", ":3"]
    examples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(2000)]
    for text in examples:
        ours = {w for w, _ in prompt_weights(text)}
        assert comfy_weights(text) <= ours, text
    assert [w for w, _ in prompt_weights("foo ((((lol (cat:666) attack:100)))) baz")] == \
        pytest.approx([1.1, 1.21, 1.331, 100.0, 666.0])
    assert check_prompt("  (watercolor:1.2), ((soft)) light\n", "prompt", 100) == "(watercolor:1.2), ((soft)) light"


def test_a_blend_costs_at_most_four_times_the_longer_prompt():
    """Lengths whose least common multiple is within 4x the shorter are repeated to it (exact for attention, as
    ComfyUI batches them); beyond, the shorter is tiled to the longer: 160 and 159 chunks blend at 160 chunks
    (their common multiple would be 25,440 chunks)."""
    chunk = 77
    assert common_length(chunk, 2 * chunk) == 2 * chunk
    assert common_length(3 * chunk, 4 * chunk) == 12 * chunk  # 4x the shorter: still exact
    assert common_length(5 * chunk, 7 * chunk) == 7 * chunk   # 35 chunks would be 7x the shorter
    assert common_length(160 * chunk, 159 * chunk) == 160 * chunk
    for a, b in ((1, 160), (159, 160), (2, 3), (7, 1)):
        assert max(a, b) * chunk <= common_length(a * chunk, b * chunk) <= 4 * max(a, b) * chunk
    long = torch.arange(160.0).repeat_interleave(chunk).view(1, -1, 1)   # chunk i holds the value i
    shorter = torch.arange(159.0).repeat_interleave(chunk).view(1, -1, 1)
    mixed = lerp_tokens(long, shorter, 1.0)
    assert mixed.shape == (1, 160 * chunk, 1)
    assert torch.equal(mixed[0, :159 * chunk], shorter[0]) and torch.equal(mixed[0, 159 * chunk:], shorter[0, :chunk])
