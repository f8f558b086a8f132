"""Flow-magnitude std (StreamingT2V appendix 9.3) and the metrics at chunk seams: known answers on synthetic videos."""
import math

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from streamv2v.streamv2v_core.metrics import (  # noqa: E402
    chunk_boundary_pairs,
    compute_flows,
    flow_magnitude_std,
    mawe,
    scene_cut_frames,
    scene_cuts,
    seam_stats,
)
from test_metrics import smooth_texture, static, translating  # noqa: E402


def speeds(steps, H=64, W=64, seed=0, sigma=3.0):
    """``[len(steps)+1, H, W, 3]``: a texture moving right by ``steps[t]`` px from frame t to t+1."""
    margin = 32
    offsets = np.concatenate([[0], np.cumsum(steps)]).astype(int)
    canvas = smooth_texture(H + 2 * margin, W + 2 * margin + offsets[-1], seed, sigma)
    starts = margin + offsets[-1] - offsets  # the window slides left, so the content moves right
    return np.stack([canvas[margin:margin + H, x:x + W] for x in starts])


def test_flow_magnitude_std_is_zero_for_steady_motion_and_sees_a_jump():
    assert flow_magnitude_std(translating(8, 96, 96, d=2, seed=0)) < 0.05
    assert flow_magnitude_std(static(5, 64, 64, seed=0)) == 0.0
    # one pair jumps 5 px among 1 px pairs: magnitudes [1]*8 + [5] -> std = 4 * sqrt(p (1 - p)), p = 1/9
    steps = [1, 1, 1, 1, 5, 1, 1, 1, 1]
    expected = 4 * math.sqrt((1 / 9) * (8 / 9))
    assert flow_magnitude_std(speeds(steps, 96, 96)) == pytest.approx(expected, rel=0.1)


def test_flow_magnitude_std_matches_a_float64_reference():
    video = np.clip(translating(6, 64, 64, d=2, seed=1) + np.random.default_rng(0).normal(0, 0.05, (6, 64, 64, 3)),
                    0, 1)
    means = []
    for forward, _ in compute_flows(video, backward=False):
        f = forward.astype(np.float64)
        means.append(np.sqrt(f[..., 0] ** 2 + f[..., 1] ** 2).mean())
    reference = math.sqrt(sum((m - sum(means) / len(means)) ** 2 for m in means) / len(means))
    assert flow_magnitude_std(video) == pytest.approx(reference, rel=1e-9, abs=1e-12)


def test_mawe_keeps_its_per_pair_numbers():
    video = translating(6, 64, 64, d=2, seed=2)
    r = mawe(video)
    assert len(r.flow_per_pair) == 5 and len(r.magnitude_per_pair) == 5
    assert np.mean(r.flow_per_pair) == pytest.approx(r.flow_score, rel=1e-12)
    assert r.magnitude_per_pair == pytest.approx([2.0] * 5, rel=0.05)


def test_chunk_boundary_pairs_follow_the_layout_and_the_vae():
    # 40 frames, chunks of 12 overlapping by 4: seams can fall at pairs 7..11, 15..19, 23..35
    assert chunk_boundary_pairs(40, 12, 4) == [7, 8, 9, 10, 11, 15, 16, 17, 18, 19, *range(23, 36)]
    # Wan: 17 video frames = 5 latent frames; chunks of 3 latents overlapping by 1 -> windows (0,3) (2,5):
    # latent pairs 1, 2 -> video pairs 4 (frames 4|5) and 8 (frames 8|9)
    assert chunk_boundary_pairs(17, 3, 1, frames_per_latent=4) == [4, 8]
    assert chunk_boundary_pairs(10, 24, 8) == []
    with pytest.raises(ValueError, match="frames_per_latent"):
        chunk_boundary_pairs(10, 4, 1, frames_per_latent=0)


def test_seam_stats_single_out_a_seam():
    """A splice at frame 20 of 40 (two different textures): a scene cut and a warp-error spike at pair 19."""
    a = translating(20, 64, 64, d=1, seed=1, sigma=6.0)
    b = translating(20, 64, 64, d=1, seed=2, sigma=6.0)
    video = np.concatenate([a, b])
    motion = mawe(video)
    cuts = scene_cut_frames(video)
    assert cuts == [20] and scene_cuts(video) == 1
    on_seam = seam_stats(motion, motion.magnitude_per_pair, cuts, [18, 19, 20])
    off_seam = seam_stats(motion, motion.magnitude_per_pair, cuts, [5, 6, 7])
    assert on_seam.scene_cuts == 1 and off_seam.scene_cuts == 0
    assert on_seam.mawe > 10 * off_seam.mawe
    assert on_seam.mawe == pytest.approx(np.mean(motion.warp.per_pair[18:21]) / np.mean(motion.flow_per_pair[18:21]),
                                         rel=1e-12)
    assert on_seam.flow_std == pytest.approx(np.std(motion.magnitude_per_pair[18:21]), rel=1e-12)
    empty = seam_stats(motion, motion.magnitude_per_pair, cuts, [])
    assert math.isnan(empty.mawe) and math.isnan(empty.flow_std) and empty.scene_cuts == 0
