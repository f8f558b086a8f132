"""The similarity filter on real footage: OpenCV's vtest.avi (people walking), 30 frames, threshold 0.98.

StreamDiffusion takes the cosine similarity of the [-1, 1] images it feeds the VAE. On [0, 1]
pixels every image is similar to every other (all values positive), so a filter computed there
skipped most frames of a moving scene. The clip comes from Debian's opencv-doc package
(scripts/setup_host.sh extracts it into .cache/); without it this test is skipped.
"""
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

from streamv2v.streamv2v_core.stream.similarity import SimilarityFilter

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
from clips import _look, load_clip  # noqa: E402

CLIP = _look("vtest.avi")


@pytest.mark.skipif(CLIP is None, reason="vtest.avi (Debian's opencv-doc) is not available; see scripts/setup_host.sh")
def test_similarity_filter_skips_few_frames_of_walking_people():
    frames = load_clip(CLIP, 30, 512)
    kept_filter = SimilarityFilter(threshold=0.98, max_skips=10, seed=0)
    skipped = [kept_filter.skip(frame) for frame in frames]
    share = sum(skipped) / len(frames)

    # The same coins against the probability on [0, 1] pixels (what the pack did before).
    g = torch.Generator().manual_seed(0)
    reference, old_skips, in_a_row = frames[0], 0, 0
    for frame in frames[1:]:
        s = float(F.cosine_similarity(frame.flatten(), reference.flatten(), dim=0))
        if in_a_row < 10 and float(torch.rand((), generator=g)) < max(0.0, (s - 0.98) / 0.02):
            old_skips, in_a_row = old_skips + 1, in_a_row + 1
        else:
            reference, in_a_row = frame, 0
    print(f"vtest.avi, 30 frames at 512x512, threshold 0.98: skipped {share:.0%} on [-1, 1] "
          f"(on [0, 1] pixels: {old_skips / len(frames):.0%})")
    assert share < 0.25
    assert not skipped[0]
