"""Live seed and strength in the stream batch (pure torch, float64): each frame keeps the schedule it entered with.

A strength change at frame k gives frames k, k+1, ... the new timesteps while the frames in flight finish with
theirs; a seed change blends the new seed's noise in by spherical interpolation. The reference is what a run with
that setting from the start gives (the denoiser here treats rows apart, as a model without a bank does), and
sequential sampling of the same frames: the stream batch must give both, to float64 rounding.
"""
import math

import pytest
import torch

from streamv2v.streamv2v_core.live.params import Change
from streamv2v.streamv2v_core.live.sampling_track import SamplingTrack
from streamv2v.streamv2v_core.stream.frame_schedule import FrameSchedule, noise_rows, shared, sigma_rows
from streamv2v.streamv2v_core.stream.noise import (MAX_BLEND_DEPTH, BlendedNoise, NoiseSource, SeedBlend, noise_of,
                                                   seed_step, slerp)
from streamv2v.streamv2v_core.stream.pipeline import InFlight, StreamPipeline
from streamv2v.streamv2v_core.stream.schedule import strength_timesteps

F64 = torch.float64
STEPS, FRAMES = 4, 12
LATENT = (1, 4, 6, 5)


def sigmas_for(strength: float) -> list[float]:
    """A discrete model's sigmas at the strength rule's timesteps (linear betas, as SD's scaled-linear shape)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=F64) ** 2
    table = ((1 - torch.cumprod(1 - betas, 0)) / torch.cumprod(1 - betas, 0)) ** 0.5
    out = []
    for t in strength_timesteps(STEPS, strength):
        low = int(math.floor(t))
        w = t - low
        out.append(float(table[low] * (1 - w) + table[min(low + 1, 999)] * w))
    return out + [0.0]


def schedule(strength: float, noise: NoiseSource) -> FrameSchedule:
    values = sigmas_for(strength)
    return FrameSchedule(torch.tensor(values, dtype=F64), tuple(values), noise, False)


def denoise(x, sigma, frames, steps):
    """A nonlinear per-row 'model' that depends on each row's sigma (rows apart: a model without a bank)."""
    s = sigma.view(-1, 1, 1, 1)
    return torch.tanh(x) / (1 + s * s) + 0.1 * torch.sin(3 * x) * s


def noise_scaling(sigma, noise, latent, max_denoise):
    scale = torch.sqrt(1 + sigma * sigma) if max_denoise else sigma
    return latent + noise * scale


def latents(n=FRAMES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(LATENT, generator=g, dtype=F64) for _ in range(n)]


def run(frame_schedules, stream_batch=True, own=None, split_at=None):
    """Outputs per frame; ``frame_schedules[i]`` is frame i's (None: the pipeline's own).

    ``split_at``: end the pipeline after that many frames and resume it with its frames in flight
    (a run that keeps frames in flight for the next one).
    """
    own = own or schedule(0.4, NoiseSource(7))
    pipe = StreamPipeline(own.sigmas, list(own.sigma_values), denoise, noise_scaling, own.noise, False)
    out = {}
    for i, latent in enumerate(latents(len(frame_schedules))):
        if split_at is not None and i == split_at:
            pipe = StreamPipeline(own.sigmas, list(own.sigma_values), denoise, noise_scaling, NoiseSource(7), False,
                                  in_flight=pipe.state)
        pipe.push(i, latent, frame_schedules[i])
        drain(pipe, out, until_empty=not stream_batch)  # one call, or every step of this frame
    drain(pipe, out, until_empty=True)  # the frames still in flight
    return torch.cat([out[i] for i in range(len(frame_schedules))])


def drain(pipe: StreamPipeline, out: dict, until_empty: bool) -> None:
    """One model call, or calls until the pipeline is empty: at most STEPS (a pipeline that never empties fails
    instead of hanging the suite)."""
    for _ in range(STEPS):
        done = pipe.step()
        if done is not None:
            out[done[0]] = done[1]
        if not until_empty or not len(pipe):
            return
    raise AssertionError(f"{len(pipe)} frames still in the pipeline after {STEPS} calls")


@pytest.mark.parametrize("stream_batch", [True, False], ids=["stream batch", "sequential"])
def test_live_strength_change_gives_the_frames_of_a_run_at_that_strength(stream_batch):
    k = 5
    before, after = schedule(0.4, NoiseSource(7)), schedule(0.65, NoiseSource(7))
    live = run([before] * k + [after] * (FRAMES - k), stream_batch)
    whole_before, whole_after = run([before] * FRAMES), run([after] * FRAMES)
    torch.testing.assert_close(live[:k], whole_before[:k], rtol=0, atol=1e-12)
    torch.testing.assert_close(live[k:], whole_after[k:], rtol=0, atol=1e-12)
    assert (whole_before[k:] - whole_after[k:]).abs().max() > 1e-2  # the strength did change the frames


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed noise", "fresh noise"])
def test_live_seed_cut_gives_the_frames_of_a_run_with_that_seed(fixed):
    k = 4
    a, b = schedule(0.5, NoiseSource(7, fixed)), schedule(0.5, NoiseSource(8, fixed))
    live = run([a] * k + [b] * (FRAMES - k))
    torch.testing.assert_close(live[:k], run([a] * FRAMES)[:k], rtol=0, atol=1e-12)
    torch.testing.assert_close(live[k:], run([b] * FRAMES)[k:], rtol=0, atol=1e-12)


def seed_track(first_seed, changes, frames, blend):
    """Each frame's seed spec from the loop's steering (``SamplingTrack``): ``changes`` {frame: seed}."""
    track, specs = SamplingTrack(), []
    for f in range(frames):
        if f in changes:
            track.apply(Change(seed=changes[f]), f, blend, first_seed)
        spec = track.seed_for(f)
        specs.append(first_seed if spec is None else spec)
    return specs


def test_seed_blend_is_a_spherical_transition_and_stream_equals_sequential():
    blend, k = 4, 3
    specs = seed_track(7, {k: 8}, FRAMES, blend)
    assert specs[:k] == [7] * k and specs[k + blend - 1:] == [8] * (FRAMES - k - blend + 1)
    assert [s.weight for s in specs[k:k + blend - 1]] == [0.25, 0.5, 0.75]
    known = {}
    frame_schedules = [schedule(0.5, noise_of(s, True, known)) for s in specs]
    live, sequential = run(frame_schedules), run(frame_schedules, stream_batch=False)
    torch.testing.assert_close(live, sequential, rtol=0, atol=1e-12)
    # frame k+1's noise at every step is the slerp halfway between the two seeds' noises
    like = torch.zeros(LATENT, dtype=F64)
    for step in range(STEPS):
        n7, n8 = NoiseSource(7).one(0, step, like), NoiseSource(8).one(0, step, like)
        mixed = frame_schedules[k + 1].noise.one(k + 1, step, like)
        torch.testing.assert_close(mixed, slerp(n7, n8, 0.5), rtol=0, atol=0)
    # after the blend the frames are those of the new seed
    whole_new = run([schedule(0.5, NoiseSource(8))] * FRAMES)
    torch.testing.assert_close(live[k + blend:], whole_new[k + blend:], rtol=0, atol=1e-12)
    assert (live[k + 1] - whole_new[k + 1]).abs().max() > 1e-3


def test_frames_in_flight_keep_their_schedules_across_runs():
    frame_schedules = [None] * 4 + [schedule(0.7, NoiseSource(9))] * 8
    whole = run(frame_schedules)
    resumed = run(frame_schedules, split_at=6)  # frames 3..5 in flight (two schedules) when the run ends
    torch.testing.assert_close(resumed, whole, rtol=0, atol=1e-12)
    old = InFlight([1, 0], [0, 1], torch.zeros(2, *LATENT[1:], dtype=F64))  # kept by an older version
    own = schedule(0.4, NoiseSource(7))
    pipe = StreamPipeline(own.sigmas, list(own.sigma_values), denoise, noise_scaling, own.noise, False, old)
    assert pipe.state.schedules == [pipe.own, pipe.own]


def test_slerp_in_float64():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 4, 8, 8, generator=g, dtype=F64), torch.randn(1, 4, 8, 8, generator=g, dtype=F64)
    torch.testing.assert_close(slerp(a, b, 0.0), a, rtol=0, atol=1e-12)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=0, atol=1e-12)
    u, v = a.flatten(), b.flatten()
    theta = math.acos(float(u @ v / (u.norm() * v.norm())))
    for w in (0.1, 0.5, 0.9):
        expected = (math.sin((1 - w) * theta) * a + math.sin(w * theta) * b) / math.sin(theta)
        torch.testing.assert_close(slerp(a, b, w), expected, rtol=0, atol=1e-12)
    # the norm stays near a Gaussian's (a linear blend of independent noises loses ~30% at the middle)
    assert abs(float(slerp(a, b, 0.5).norm() / a.norm()) - 1) < 0.1
    assert float(((a + b) / 2).norm() / a.norm()) < 0.8
    torch.testing.assert_close(slerp(a, a, 0.3), a, rtol=0, atol=1e-12)  # parallel: the linear blend, no NaN


def test_seed_specs_stay_bounded_and_sources_are_shared():
    spec = 1
    for seed in range(2, 40):  # a seed change every frame, each starting from the previous frame's blend
        spec = seed_step(spec, seed, 0.3)
        assert not isinstance(spec, SeedBlend) or spec.depth <= MAX_BLEND_DEPTH
    assert seed_step(5, 5, 0.2) == 5 and seed_step(SeedBlend(1, 2, 0.5), 3, 1.0) == 3
    known = {}
    a, b = noise_of(SeedBlend(1, 2, 0.5), True, known), noise_of(SeedBlend(1, 2, 0.5), True, known)
    assert a is b and isinstance(a, BlendedNoise) and noise_of(1, True, known) is a.start


def test_rows_of_one_schedule_take_the_fast_path():
    one = schedule(0.4, NoiseSource(7))
    twin = schedule(0.4, NoiseSource(7))  # equal values, other objects (a new run's own schedule)
    assert shared([one, twin, one]) is one
    assert shared([one, schedule(0.5, NoiseSource(7))]) is None
    rows = sigma_rows([one, one], [1, 2])
    assert rows.data_ptr() == one.sigmas[1:].data_ptr()  # a view: no kernel
    like = torch.zeros(LATENT, dtype=F64)
    assert noise_rows([one, twin], [3, 2], [0, 1], like) is noise_rows([one, one], [5, 4], [0, 1], like)
    mixed = sigma_rows([one, schedule(0.5, NoiseSource(7))], [0, 1])
    assert mixed.tolist() == [one.sigma_values[0], sigmas_for(0.5)[1]]


def test_a_seed_changed_during_its_blend_starts_from_where_the_blend_was():
    specs = seed_track(7, {2: 8, 4: 9}, 10, 4)
    assert specs[4] == SeedBlend(SeedBlend(7, 8, 0.5), 9, 0.25)  # frame 3 had 8 at 0.5 of the way
    assert specs[7:] == [9, 9, 9]
    track = SamplingTrack()
    track.apply(Change(strength=0.6, cfg=2.0), 0, 4, 7)
    assert (track.strength, track.cfg, track.residual_delta, track.seed_for(0), track.steered) == \
        (0.6, 2.0, None, None, True)
