"""Known-answer tests for streamv2v_core.metrics (warp error, OFS, MAWE, SCuts, CLIP consistency, plot).

Synthetic videos only (64x64 .. 96x96, a few dozen frames), so the whole file runs in a few seconds
on CPU.
"""

import math

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from streamv2v.streamv2v_core.metrics import (  # noqa: E402
    MaweResult,
    WarpErrorResult,
    clip_frame_consistency,
    compute_flows,
    consecutive_cosine_similarities,
    flow_score,
    mawe,
    plot_per_frame,
    scene_cuts,
    warp_error,
)


# --------------------------------------------------------------------------- synthetic videos
def smooth_texture(h, w, seed, sigma=3.0):
    """Random colour texture blurred with a Gaussian of ``sigma`` px, each channel stretched to 0..1."""
    r = np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)
    t = cv2.GaussianBlur(r, (0, 0), sigma)
    lo, hi = t.min(axis=(0, 1)), t.max(axis=(0, 1))
    return (t - lo) / (hi - lo)


def translating(T, H, W, d, seed, sigma=3.0):
    """``[T, H, W, 3]`` video of a texture moving right by ``d`` px per frame.

    The texture lives on a larger canvas that is rolled with np.roll and then cropped, so the
    wrap-around seam of np.roll never enters the visible window.
    """
    margin = 32
    canvas = smooth_texture(H + 2 * margin, W + 2 * margin + d * T, seed, sigma)
    return np.stack(
        [np.roll(canvas, d * t, axis=1)[margin:margin + H, margin:margin + W] for t in range(T)]
    )


def static(T, H, W, seed):
    return np.repeat(smooth_texture(H, W, seed)[None], T, axis=0)


# --------------------------------------------------------------------------- warp error
def test_static_video_has_zero_warp_error():
    v = static(5, 64, 64, seed=0)
    r = warp_error(v)
    assert isinstance(r, WarpErrorResult)
    assert len(r.per_pair) == 4 and len(r.valid_fraction) == 4
    assert r.mean == 0.0 and all(e == 0.0 for e in r.per_pair)
    assert all(f == 1.0 for f in r.valid_fraction)  # zero flow: nothing occluded
    assert r.flow_from == "output"
    assert warp_error(v, v).mean == 0.0
    assert warp_error(v, v).flow_from == "source"


def test_pure_translation_has_near_zero_warp_error():
    # 2 px/frame translation of a smooth texture: DIS recovers the shift to ~0.01 px, so the
    # warped frame matches the next one up to bilinear-interpolation error. 1.0 on the 0..255
    # MSE scale means an RMS error below one grey level (real stylised videos score ~100).
    v = translating(8, 96, 96, d=2, seed=0)
    r = warp_error(v)
    assert len(r.per_pair) == 7
    assert r.mean < 1.0, r.per_pair
    # only the 2-px strip of newly revealed content (plus DIS border effects) is excluded
    assert all(0.9 < f < 1.0 for f in r.valid_fraction), r.valid_fraction
    # stylised output that moves with the source: flow from the source warps it just as well
    styl = 1.0 - v  # "stylisation" = colour inversion, same motion
    assert warp_error(styl, v).mean < 1.0


def test_warp_uses_source_flow():
    moving = translating(6, 64, 64, d=2, seed=1)
    still = static(6, 64, 64, seed=2)
    # output moves but the source says "no motion": the un-warped frames differ
    assert warp_error(moving, still).mean > 50.0
    # with the matching source the error vanishes
    assert warp_error(moving, moving).mean < 1.0


def test_independent_noise_has_high_warp_error():
    noise = np.random.default_rng(3).random((6, 64, 64, 3))
    # zero flow (static source): E[(a-b)^2] for independent U(0,1) is 1/6, times 255^2
    expected = 255.0 ** 2 / 6.0  # 10837.5
    r = warp_error(noise, static(6, 64, 64, seed=4))
    assert r.mean == pytest.approx(expected, rel=0.05)
    assert all(f == 1.0 for f in r.valid_fraction)
    # flow of the noise itself: most pixels fail the consistency check, the rest still differ
    assert warp_error(noise).mean > 1000.0


def test_errors_are_computed_in_float_not_uint8():
    # bright frame then dark frame, static source => zero flow, every pixel compared.
    # correct: (204 - 51)^2 = 153^2 = 23409; a uint8 subtraction 51 - 204 wraps to 103 -> 10609.
    src = static(2, 32, 32, seed=5)
    bright_dark = np.stack([np.full((32, 32, 3), 0.8), np.full((32, 32, 3), 0.2)])
    assert warp_error(bright_dark, src).mean == pytest.approx(153.0 ** 2, rel=1e-5)
    assert warp_error(bright_dark[::-1].copy(), src).mean == pytest.approx(153.0 ** 2, rel=1e-5)


def test_torch_input_matches_numpy():
    torch = pytest.importorskip("torch")
    v = translating(4, 64, 64, d=1, seed=6)
    out = np.clip(v + 0.05 * np.random.default_rng(7).standard_normal(v.shape), 0, 1).astype(np.float32)
    a = warp_error(out, v)
    b = warp_error(torch.from_numpy(out), torch.from_numpy(v))
    assert a.per_pair == pytest.approx(b.per_pair, rel=1e-9)
    assert flow_score(torch.from_numpy(v)) == pytest.approx(flow_score(v), rel=1e-9)


# --------------------------------------------------------------------------- flow score
def test_flow_score_of_translation_is_squared_speed():
    # OFS = mean |flow|^2; a uniform d px/frame translation gives d^2. Tolerance 5%: DIS is
    # accurate to ~0.01 px in the interior, and the few border pixels where new content enters
    # bias the mean by well under 0.1 px (the 5% of 4 px^2 corresponds to ~0.05 px of speed).
    v2 = translating(6, 96, 96, d=2, seed=0)
    assert flow_score(v2) == pytest.approx(4.0, rel=0.05)
    v1 = translating(6, 96, 96, d=1, seed=0)
    assert flow_score(v1) == pytest.approx(1.0, rel=0.05)
    assert flow_score(static(4, 64, 64, seed=0)) == 0.0
    fw, bw = compute_flows(v2)[0]
    assert fw.shape == (96, 96, 2) and bw.shape == (96, 96, 2)
    assert np.median(fw[..., 0]) == pytest.approx(2.0, abs=0.05)   # t -> t+1: moves right
    assert np.median(bw[..., 0]) == pytest.approx(-2.0, abs=0.05)  # t+1 -> t: moves left


def test_flow_score_resize_scales_with_resolution():
    v = translating(4, 64, 64, d=2, seed=0)
    # upsampling 2x doubles the displacement, so OFS grows ~4x
    assert flow_score(v, size=(128, 128)) == pytest.approx(16.0, rel=0.08)


# --------------------------------------------------------------------------- MAWE
def test_mawe_is_warp_error_over_flow_score():
    v = translating(8, 96, 96, d=2, seed=0)
    r = mawe(v)
    assert isinstance(r, MaweResult)
    assert r.warp_error == pytest.approx(warp_error(v).mean, rel=1e-12)
    assert r.flow_score == pytest.approx(flow_score(v), rel=1e-12)
    assert r.mawe == pytest.approx(r.warp_error / r.flow_score, rel=1e-12)
    assert float(r) == r.mawe
    assert r.mawe < 0.25  # consistent and moving -> small
    # optional scale constant (the authors' script uses 9.5): W / (c * OFS)
    assert mawe(v, c=9.5).mawe == pytest.approx(r.mawe / 9.5, rel=1e-12)


def test_mawe_penalises_static_and_inconsistent_videos():
    assert mawe(static(5, 64, 64, seed=0)).mawe == math.inf  # no motion: worst score
    noise = np.random.default_rng(8).random((6, 64, 64, 3))
    moving = translating(6, 64, 64, d=2, seed=1)
    assert mawe(noise).mawe > 100 * mawe(moving).mawe
    # V2V: flow (hence OFS) from the source
    styl = 1.0 - moving
    r = mawe(styl, moving)
    assert r.flow_score == pytest.approx(flow_score(moving), rel=1e-12)
    assert r.mawe < 0.25
    with pytest.raises(ValueError, match="c must be"):
        mawe(moving, c=0)


# --------------------------------------------------------------------------- scene cuts
def test_scene_cuts_counts_splices():
    # slow (1 px/frame) smooth motion keeps AdaptiveDetector's frame-to-frame score low, so the
    # splice stands out; each part is longer than the default min_scene_len of 15 frames.
    a = translating(20, 64, 64, d=1, seed=1, sigma=6.0)
    b = translating(20, 64, 64, d=1, seed=2, sigma=6.0)
    c = translating(20, 64, 64, d=1, seed=3, sigma=6.0)
    assert scene_cuts(translating(40, 64, 64, d=1, seed=1, sigma=6.0)) == 0
    assert scene_cuts(np.concatenate([a, b])) == 1
    assert scene_cuts(np.concatenate([a, b, c])) == 2
    assert scene_cuts(static(10, 64, 64, seed=0)) == 0


# --------------------------------------------------------------------------- CLIP consistency
def test_clip_frame_consistency_matches_float64_reference():
    e = np.random.default_rng(9).standard_normal((12, 768)).astype(np.float32)
    ref = 0.0
    for t in range(11):
        a, b = e[t].astype(np.float64), e[t + 1].astype(np.float64)
        ref += float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    ref = ref / 11 * 100.0
    assert clip_frame_consistency(e) == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert len(consecutive_cosine_similarities(e)) == 11
    assert clip_frame_consistency(e[:, None, :]) == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_clip_frame_consistency_identical_and_opposite():
    v = np.random.default_rng(10).standard_normal(512)
    same = np.stack([v] * 5)
    assert clip_frame_consistency(same) == pytest.approx(100.0, abs=1e-9)
    assert clip_frame_consistency(np.stack([v, -v])) == pytest.approx(-100.0, abs=1e-9)
    assert clip_frame_consistency(np.stack([v, 3.0 * v])) == pytest.approx(100.0, abs=1e-9)


def test_clip_frame_consistency_torch():
    torch = pytest.importorskip("torch")
    e = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    assert clip_frame_consistency(e) == pytest.approx(clip_frame_consistency(e.numpy()), rel=1e-12)
    assert clip_frame_consistency(e.to(torch.bfloat16)) == pytest.approx(
        clip_frame_consistency(e.to(torch.bfloat16).float().numpy()), rel=1e-12
    )


# --------------------------------------------------------------------------- plot
def test_plot_per_frame_image():
    img = plot_per_frame([3.0, 1.0, float("nan"), 4.0, 1.5], "warp error", width=320, height=200)
    assert img.shape == (200, 320, 3) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert (img < 0.5).any() and (img == 1.0).any()  # something drawn on a white background
    assert plot_per_frame([2.0], "one").shape == (320, 640, 3)  # single / constant values
    assert plot_per_frame(np.full(100, 7.0), "flat").shape == (320, 640, 3)
    with pytest.raises(ValueError, match="empty"):
        plot_per_frame([], "nothing")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda v: warp_error(v, v[:-1]), "frames but source_frames has"),
        (lambda v: warp_error(v, v[:, :32]), "resize one of them"),
        (lambda v: mawe(v, v[:, :, :32]), "resize one of them"),
        (lambda v: warp_error(v[:1]), "at least 2 frames"),
        (lambda v: flow_score(v[:1]), "at least 2 frames"),
        (lambda v: scene_cuts(v[:1]), "at least 2 frames"),
        (lambda v: warp_error(np.concatenate([v, v[..., :1]], axis=-1)), "3 colour channels"),
        (lambda v: flow_score(v[..., :1]), "3 colour channels"),
        (lambda v: warp_error(v[0]), r"\[T, H, W, 3\]"),
        (lambda v: warp_error(v * 255.0), "divide by 255"),
        (lambda v: warp_error(None), "pass a video"),
        (lambda v: clip_frame_consistency(np.ones((1, 8))), "at least 2 frames"),
        (lambda v: clip_frame_consistency(np.ones(8)), r"\[T, D\]"),
        (lambda v: clip_frame_consistency(np.zeros((3, 8))), "zero vector"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    v = static(3, 64, 64, seed=0)
    with pytest.raises(ValueError, match=match):
        call(v)
