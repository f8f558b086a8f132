"""Every frame its own conditioning: per-frame prompts and ControlNet hints through the stream batch.

The reference is what a user gets running the frames one per prompt, each with its own
prompt row and hint (bank continued): one sampler run per frame, ``bank_start`` continue.
A stream-batch run with one row per frame must give those frames (float64 UNet and
ControlNets, so only rounding is left), bank on and off, stream batch on and off, and with
frames kept in flight across runs.
"""
import pytest
import torch

from host import tiny_models
from nodes import ControlNetApplyAdvanced
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
from streamv2v.nodes.sampler_nodes import StreamV2VSampler
from streamv2v.nodes.engine import CONTINUE, FRESH, IN_FLIGHT, StreamSettings, run_stream
from streamv2v.streamv2v_core import BANKS
from streamv2v.streamv2v_core.stream.conditioning import FrameConditioning

FRAMES, SIZE = 6, 64
F64 = torch.float64


def frames_of(n, seed):
    g = torch.Generator().manual_seed(seed)
    canvas = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16 + n, generator=g), scale_factor=SIZE / 16,
                                             mode="bilinear")[0].permute(1, 2, 0)
    return torch.stack([canvas[:, 2 * i: 2 * i + SIZE] for i in range(n)]).contiguous()


def controlnet(seed):
    control = tiny_models.tiny_controlnet(seed)
    control.control_model.to(F64)
    control.control_model.dtype = F64
    return control


@pytest.fixture(scope="module")
def host():
    model = tiny_models.tiny_sd15_model(0, dtype=F64)
    vae = tiny_models.tiny_taesd_vae(1)
    pos = tiny_models.random_conditioning("sd15", 1, batch=FRAMES)
    neg = tiny_models.random_conditioning("sd15", 2)
    return model, vae, [[pos[0][0].to(F64), {}]], [[neg[0][0].to(F64), {}]]


def banked(model, name):
    BANKS.remove(name)
    handle = FeatureBankNode.execute(name, "dyme", 1, 1, 0).args[0]
    model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    return FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]


def sample(model, vae, pos, neg, images, **kw):
    args = dict(seed=1, steps=4, strength=0.4, cfg=1.0, stream_batch=True, fixed_noise=True) | kw
    with torch.inference_mode():
        return StreamV2VSampler.execute(model, pos, neg, vae, images, **args).args[0]


def with_controls(pos, neg, hints_and_ranges):
    for control, hint, start, end in hints_and_ranges:
        pos, neg = ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, hint, 0.9, start, end)
    return pos, neg


def rows(conditioning, i):
    """Frame i's own conditioning: row i of every per-frame tensor and hint (a user's one-frame prompt)."""
    out = []
    for tensor, extras in conditioning:
        own = dict(extras)
        if "control" in extras:
            own["control"] = _control_rows(extras["control"], i)
        out.append([tensor[i:i + 1] if tensor.shape[0] > 1 else tensor, own])
    return out


def _control_rows(control, i):
    if control is None:
        return None
    copy = control.copy()
    hint = control.cond_hint_original
    copy.cond_hint_original = hint[i:i + 1] if hint.shape[0] > 1 else hint
    copy.previous_controlnet = _control_rows(control.previous_controlnet, i)
    return copy


def one_per_prompt(model, vae, pos, neg, images, cfg=1.0):
    """Each frame alone in its own sampler run, with its own rows, bank and noise continued."""
    outs = []
    for i in range(images.shape[0]):
        own_pos, own_neg = _per_frame_pair(pos, neg, i)
        outs.append(sample(model, vae, own_pos, own_neg, images[i:i + 1], stream_batch=False, cfg=cfg,
                           bank_start=FRESH if i == 0 else CONTINUE))
    return torch.cat(outs)


def _per_frame_pair(pos, neg, i):
    memo = {}
    # Positive and negative share each ControlNet object (core applies one copy to both): keep that.
    own_pos = rows(pos, i)
    for (_, extras), (_, own) in zip(pos, own_pos):
        if "control" in extras:
            memo[id(extras["control"])] = own["control"]
    own_neg = []
    for tensor, extras in neg:
        own = dict(extras)
        if "control" in extras:
            own["control"] = memo.get(id(extras["control"])) or _control_rows(extras["control"], i)
        own_neg.append([tensor, own])
    return own_pos, own_neg


@pytest.mark.parametrize("bank", [False, True], ids=["no bank", "bank"])
@pytest.mark.parametrize("stream_batch", [True, False], ids=["stream batch", "sequential"])
def test_per_frame_prompts_and_hints_equal_one_frame_per_prompt(host, bank, stream_batch):
    model, vae, pos, neg = host
    model = banked(model, "per-frame") if bank else model
    images = frames_of(FRAMES, 3)
    hints = frames_of(FRAMES, 9)
    c_pos, c_neg = with_controls(pos, neg, [(controlnet(4), hints, 0.0, 1.0)])
    stream = sample(model, vae, c_pos, c_neg, images, stream_batch=stream_batch)
    reference = one_per_prompt(model, vae, c_pos, c_neg, images)
    torch.testing.assert_close(stream, reference, rtol=0, atol=1e-4)
    shared_hint = sample(model, vae, *with_controls(pos, neg, [(controlnet(4), hints[:1], 0.0, 1.0)]), images)
    assert (stream - shared_hint).abs().max() > 1e-3, "the per-frame hints changed nothing"


def test_two_controlnets_with_start_end_percent_and_cfg(host):
    model, vae, pos, neg = host
    model = banked(model, "per-frame-two")
    images, hints_a, hints_b = frames_of(FRAMES, 3), frames_of(FRAMES, 9), frames_of(FRAMES, 11)
    c_pos, c_neg = with_controls(pos, neg, [(controlnet(4), hints_a, 0.0, 0.6), (controlnet(5), hints_b, 0.3, 1.0)])
    stream = sample(model, vae, c_pos, c_neg, images, cfg=2.0)
    reference = one_per_prompt(model, vae, c_pos, c_neg, images, cfg=2.0)
    torch.testing.assert_close(stream, reference, rtol=0, atol=1e-4)


def test_frames_in_flight_keep_their_own_conditioning(host):
    """One frame per run (Auto Queue / comfystream), each run with that frame's rows: equals one stream run."""
    model, vae, pos, neg = host
    images, hints = frames_of(FRAMES, 3), frames_of(FRAMES, 9)
    c_pos, c_neg = with_controls(pos, neg, [(controlnet(4), hints, 0.0, 1.0)])
    stream = sample(banked(model, "per-frame-whole"), vae, c_pos, c_neg, images)
    model = banked(model, "per-frame-flight")  # a new bank: its first run starts the stream
    outs = []
    for i in range(FRAMES + 3):  # 3 more runs of the last frame push the in-flight frames out
        own_pos, own_neg = _per_frame_pair(c_pos, c_neg, min(i, FRAMES - 1))
        outs.append(sample(model, vae, own_pos, own_neg, images[min(i, FRAMES - 1)][None],
                           bank_start=IN_FLIGHT))
    torch.testing.assert_close(torch.cat(outs)[3:], stream, rtol=0, atol=1e-4)


def test_a_frame_conditioning_provider_equals_per_frame_rows(host):
    """The loop's way in: each frame's own prompt and hint handed over as it enters."""
    model, vae, pos, neg = host
    images, hints = frames_of(FRAMES, 3), frames_of(FRAMES, 9)
    control = controlnet(4)
    batch = sample(model, vae, *with_controls(pos, neg, [(control, hints, 0.0, 1.0)]), images)
    one_row_pos, one_row_neg = with_controls([[pos[0][0][:1], {}]], neg, [(control, hints[:1], 0.0, 1.0)])
    own_prompts = [[[pos[0][0][i:i + 1], {}]] for i in range(FRAMES)]
    seen = []

    def provider(frame):
        index = frame.index
        seen.append(index)
        return FrameConditioning(positive=own_prompts[index], hint=hints[index:index + 1])

    outs = [None] * FRAMES
    settings = StreamSettings(seed=1, steps=4, strength=0.4)
    with torch.inference_mode():
        run_stream(model, one_row_pos, one_row_neg, vae, iter(images), settings,
                   lambda out: outs.__setitem__(out.index, out.image), conditioning=provider)
    assert seen == list(range(FRAMES))
    torch.testing.assert_close(torch.stack(outs), batch, rtol=0, atol=1e-4)


def test_wrong_row_counts_are_refused_before_any_work(host):
    model, vae, pos, neg = host
    images = frames_of(4, 3)
    with pytest.raises(ValueError, match=r"positive conditioning's text embedding \(entry 0\) has 6 rows for 4 "
                                         r"frames.*one per frame \(4\)"):
        sample(model, vae, pos, neg, images)
    three_hints = with_controls([[pos[0][0][:1], {}]], neg, [(controlnet(4), frames_of(3, 9), 0.0, 1.0)])
    with pytest.raises(ValueError, match=r"ControlNet hint \(ControlNet\) \(entry 0\) has 3 rows for 4 frames.*"
                                         r"Apply ControlNet"):
        sample(model, vae, *three_hints, images)
