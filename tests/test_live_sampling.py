"""Live seed, strength and cfg through the stream engine (real ComfyUI sampling, float64 tiny UNet).

A frame's own strength, seed or cfg (``FrameConditioning``, what the loop's steering gives a frame after a live
change) must give, from the frame it applies at, the frames a run with that setting gives: the frames in flight
finish with theirs. Without a bank every frame stands alone, so the reference is a whole run at each setting;
with a bank, the stream batch must equal sequential sampling of the same frames (each frame alone through its
steps with its own setting), and a seed cut equals a run continued with the new seed (``bank_start`` continue).
"""
import pytest
import torch

from host import tiny_models
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
from streamv2v.nodes.engine import CONTINUE, FRESH, StreamSettings, run_stream
from streamv2v.streamv2v_core import BANKS
from streamv2v.streamv2v_core.stream.conditioning import FrameConditioning
from streamv2v.streamv2v_core.stream.noise import SeedBlend

FRAMES, SIZE, K = 6, 32, 3  # 3 steps: 2 frames in flight when a change comes at frame K
F64 = torch.float64


@pytest.fixture(scope="module")
def host():
    model, vae, pos, neg = tiny_models.float64_stream_parts()
    g = torch.Generator().manual_seed(3)
    canvas = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16 + FRAMES, generator=g), scale_factor=SIZE / 16,
                                             mode="bilinear")[0].permute(1, 2, 0)
    images = torch.stack([canvas[:, 2 * i: 2 * i + SIZE] for i in range(FRAMES)]).contiguous()
    return model, vae, pos, neg, images


def banked(model, name):
    BANKS.remove(name)
    handle = FeatureBankNode.execute(name, "dyme", 1, 1, 0).args[0]
    model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    return FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]


REFERENCES = {}


def reference(host, **settings):
    """A whole run at ``settings`` (no bank, no live change), made once per module."""
    key = tuple(sorted(settings.items()))
    if key not in REFERENCES:
        REFERENCES[key] = run(host, **settings)
    return REFERENCES[key]


def run(host, model=None, images=None, provider=None, **settings):
    base, vae, pos, neg, frames = host
    frames = frames if images is None else images
    outs = [None] * frames.shape[0]
    args = dict(seed=1, steps=3, strength=0.4) | settings
    with torch.inference_mode():
        run_stream(model or base, pos, neg, vae, iter(frames), StreamSettings(**args),
                   lambda out: outs.__setitem__(out.index, out.image), conditioning=provider)
    return torch.stack(outs)


def from_frame(k, **own):
    """The steering's provider: frames from ``k`` on carry ``own`` (a live change at frame k)."""
    return lambda frame: FrameConditioning(**own) if frame.index >= k else None


@pytest.mark.parametrize("change,setting", [({"strength": 0.65}, {"strength": 0.65}), ({"seed": 9}, {"seed": 9}),
                                            ({"cfg": 2.5}, {"cfg": 2.5})], ids=["strength", "seed", "cfg"])
def test_a_live_change_gives_the_frames_of_a_run_with_that_setting(host, change, setting):
    live = run(host, provider=from_frame(K, **change))
    before, after = reference(host), reference(host, **setting)
    torch.testing.assert_close(live[:K], before[:K], rtol=0, atol=1e-4)
    torch.testing.assert_close(live[K:], after[K:], rtol=0, atol=1e-4)
    assert (before[K:] - after[K:]).abs().max() > 1e-3, "the setting changed nothing"


@pytest.mark.parametrize("change", [{"strength": 0.65}, {"seed": SeedBlend(1, 9, 0.5)}, {"cfg": 2.5}],
                         ids=["strength", "seed blend", "cfg"])
def test_with_a_bank_the_stream_batch_equals_sequential_sampling(host, change):
    model, *_ = host
    stream = run(host, banked(model, "live-sampling-a"), provider=from_frame(K, **change))
    sequential = run(host, banked(model, "live-sampling-b"), provider=from_frame(K, **change), stream_batch=False)
    torch.testing.assert_close(stream, sequential, rtol=0, atol=1e-4)
    if "cfg" not in change:  # (with the bank the unchanged frames are the bank run's own: one more run)
        return
    unchanged = run(host, banked(model, "live-sampling-c"))
    torch.testing.assert_close(stream[:K], unchanged[:K], rtol=0, atol=1e-4)  # frames in flight kept theirs


def test_a_seed_cut_with_a_bank_equals_a_run_continued_with_that_seed(host):
    model, *_ = host
    live = run(host, banked(model, "live-seed-a"), provider=from_frame(K, seed=9))
    continued = banked(model, "live-seed-b")
    first = run(host, continued, images=host[4][:K], bank_start=FRESH)
    rest = run(host, continued, images=host[4][K:], bank_start=CONTINUE, seed=9)
    torch.testing.assert_close(live, torch.cat([first, rest]), rtol=0, atol=1e-4)


def test_residual_guidance_follows_a_live_cfg_and_delta(host):
    live = run(host, provider=from_frame(K, cfg=2.0, residual_delta=0.5), guidance="residual self-negative")
    after = run(host, cfg=2.0, residual_delta=0.5, guidance="residual self-negative")
    torch.testing.assert_close(live[K:], after[K:], rtol=0, atol=1e-4)
    torch.testing.assert_close(live[:K], reference(host)[:K], rtol=0, atol=1e-4)  # cfg 1: no guidance
