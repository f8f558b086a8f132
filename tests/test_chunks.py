"""streamv2v_core.blend.chunks (StreamingT2V randomized blending, section 4.3), checked against the paper.

Pure logic, no model: the layout equals ComfyUI's standard_static context schedule, every frame has
exactly one owner inside it, the cuts are uniform over each overlap's O + 1 positions (chi-square, fixed
seed) and reproducible from (seed, step, overlap), and joining at the cuts is the paper's eq. 8 (a
float64 reference that concatenates x^{n-1}[:cut] and x^n[cut:]).
"""
import itertools

import numpy as np
import pytest
import torch

from streamv2v.streamv2v_core.blend.chunks import chunk_windows, draw_seams, frame_owners, join_chunks, seam_pairs

# chi-square critical values at p = 0.001 for 1..24 degrees of freedom
CHI2_999 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91, 34.53, 36.12,
            37.70, 39.25, 40.79, 42.31, 43.82, 45.31, 46.80, 48.27, 49.73, 51.18]


def chi_square(counts):
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_layout_is_comfyuis_static_schedule():
    import comfy.context_windows as cw

    for frames, length, overlap in itertools.product(range(1, 60), (1, 4, 7, 24), (0, 1, 3, 8)):
        if overlap >= length:
            continue
        handler = cw.IndexListContextHandler(cw.get_matching_context_schedule("standard_static"),
                                             cw.get_matching_fuse_method("flat"), length, overlap)
        core = cw.create_windows_static_standard(frames, handler, {})
        assert [list(w) for w in chunk_windows(frames, length, overlap)] == core, (frames, length, overlap)


def test_layout_covers_every_frame_with_equal_chunks():
    windows = chunk_windows(96, 24, 8)
    assert [(w.start, w.stop) for w in windows] == [(0, 24), (16, 40), (32, 56), (48, 72), (64, 88), (72, 96)]
    assert chunk_windows(10, 24, 8) == [range(10)]
    with pytest.raises(ValueError, match="overlap < chunk_length"):
        chunk_windows(96, 8, 8)


def test_seams_are_uniform_over_each_overlap_and_reproducible():
    windows = chunk_windows(40, 12, 4)  # (0,12) (8,20) (16,28) (24,36) (28,40): last overlap 8
    counts = [np.zeros(windows[k - 1].stop - windows[k].start + 1) for k in range(1, len(windows))]
    for step in range(2000):
        seams = draw_seams(windows, seed=7, step=step)
        assert seams == draw_seams(windows, seed=7, step=step)
        for k, seam in enumerate(seams):
            counts[k][seam - windows[k + 1].start] += 1
    for c in counts:  # O + 1 = 5 positions (9 for the moved-back last chunk), each ~1/(O+1)
        assert chi_square(c) < CHI2_999[c.size - 2], c
    # a cut depends on its own (seed, step, overlap) only, not on how many chunks follow
    assert draw_seams(chunk_windows(28, 12, 4), 7, 3) == draw_seams(windows, 7, 3)[:2]
    other_seed = [draw_seams(windows, 8, step) for step in range(20)]
    assert other_seed != [draw_seams(windows, 7, step) for step in range(20)]


def test_overlap_frame_comes_from_the_earlier_chunk_with_the_papers_probability():
    # Paper: frame f (1-based) of an overlap of O frames uses chunk n-1 with probability 1 - f/(O+1).
    windows, overlap, steps = chunk_windows(28, 12, 4), 4, 3000
    earlier = np.zeros(overlap)
    for step in range(steps):
        owners = frame_owners(windows, draw_seams(windows, 1, step), 28)
        earlier += [owners[8 + j] == 0 for j in range(overlap)]
    expected = np.array([1 - f / (overlap + 1) for f in range(1, overlap + 1)])
    assert np.abs(earlier / steps - expected).max() < 0.03


@pytest.mark.parametrize("frames, length, overlap", [(96, 24, 8), (42, 24, 8), (25, 24, 20), (31, 6, 5), (9, 3, 0)])
def test_every_frame_has_exactly_one_owner_that_contains_it(frames, length, overlap):
    windows = chunk_windows(frames, length, overlap)
    for step in range(50):
        seams = draw_seams(windows, 3, step)
        owners = frame_owners(windows, seams, frames)
        assert len(owners) == frames
        for f, k in enumerate(owners):
            assert f in windows[k]


def test_join_is_the_papers_concatenation_at_the_cut():
    """Eq. 8 for two chunks, float64: x = concat(x^{n-1}[0 : F - O + c], x^n[c : F]) with cut c in 0..O."""
    g = torch.Generator().manual_seed(0)
    frames, length, overlap = 20, 12, 4
    windows = chunk_windows(frames, length, overlap)  # (0,12) (8,20)
    chunks = [torch.randn(2, 3, len(w), 5, generator=g, dtype=torch.float64) for w in windows]
    for step in range(30):
        seams = draw_seams(windows, 11, step)
        cut = seams[0] - windows[1].start
        reference = torch.cat([chunks[0][:, :, :length - overlap + cut], chunks[1][:, :, cut:]], dim=2)
        joined = join_chunks(chunks, windows, frame_owners(windows, seams, frames), dim=2)
        assert torch.equal(joined, reference)


def test_seam_pairs_are_the_overlaps_and_their_edges():
    assert seam_pairs(chunk_windows(40, 12, 4)) == [7, 8, 9, 10, 11, 15, 16, 17, 18, 19, 23, 24, 25, 26, 27, 28,
                                                     29, 30, 31, 32, 33, 34, 35]
    assert seam_pairs(chunk_windows(12, 4, 0)) == [3, 7]
    assert seam_pairs(chunk_windows(5, 8, 2)) == []
