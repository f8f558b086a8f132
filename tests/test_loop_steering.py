"""The loop's per-frame conditioning provider (nodes/loop/steering.py), in-process: each frame's hint, the
prompt schedule's per-frame blend and its CLIP encodes, live changes (blend over N frames, one encode, bad values
refused), and that the run's own CONDITIONING and ControlNet objects are never changed."""
import re

import pytest
import torch

import nodes as comfy_nodes
from host import tiny_models
from host.clips import make_clip, read_back
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
from streamv2v.nodes.loop.steering import (HINT_CANNY, HINT_FRAME, HINT_PREVIOUS, HINT_VIDEO,
                                               SteeringChoice, FrameSteering)
from streamv2v.streamv2v_core import BANKS
from streamv2v.streamv2v_core.live.params import Capabilities, Change, LiveParams, parse_change, read_json
from streamv2v.streamv2v_core.live.session import SESSIONS
from streamv2v.streamv2v_core.media import hints
from streamv2v.streamv2v_core.stream.frame import Frame, Output
from streamv2v.streamv2v_core.stream.prompt_schedule import lerp_tokens


class CountingClip:
    """A tiny CLIP that counts its encodes (the cost of a prompt change)."""

    def __init__(self):
        self.clip, self.encodes = tiny_models.tiny_clip("sd15", 1), []

    def tokenize(self, text):
        return self.clip.tokenize(text)

    def encode_from_tokens_scheduled(self, tokens):
        self.encodes.append(tokens)
        return self.clip.encode_from_tokens_scheduled(tokens)


@pytest.fixture(scope="module")
def parts():
    BANKS.remove("cond_test")
    handle = FeatureBankNode.execute("cond_test", "dyme", 1, 4, 0).args[0]
    model = tiny_models.tiny_sd15_model(0, out_scale=0.1)
    model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    clip = CountingClip()
    text = tiny_models.encode_prompt(clip.clip, "a photo")
    placeholder = torch.zeros(1, 64, 64, 3)
    positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        text, text, tiny_models.tiny_controlnet(0), placeholder, 0.8, 0.0, 1.0)
    return model, clip, positive


def frames(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(64, 64, 3, generator=g) for _ in range(count)]


def test_canny_and_frame_hints_are_each_frames_own(parts):
    model, clip, positive = parts
    for mode, make in ((HINT_CANNY, hints.canny), (HINT_FRAME, hints.as_hint)):
        provider = FrameSteering(model, positive, None, SteeringChoice(control_hint=mode))
        for i, frame in enumerate(frames(5, seed=3)):
            given = provider(Frame(frame, index=i))
            assert given.positive is None and given.control_scale == 1.0  # the run's own prompt
            assert given.hint.shape == (1, 64, 64, 3) and torch.equal(given.hint, make(frame)), (mode, i)
        assert f"ControlNet hint per frame: {mode} (5 frames)" in provider.report()


def test_previous_output_hint_follows_the_finished_frames(parts):
    model, _, positive = parts
    provider = FrameSteering(model, positive, None, SteeringChoice(control_hint=HINT_PREVIOUS))
    shown = []
    put = provider.watch(lambda out: shown.append(out.index))
    first, second, output = frames(3, seed=5)
    assert torch.equal(provider(Frame(first, index=0)).hint[0], first)  # nothing finished yet: the frame itself
    put(Output(0, output, Frame(first)))
    assert torch.equal(provider(Frame(second, index=1)).hint[0], output) and shown == [0]


def test_hint_video_is_aligned_with_skip_and_every_nth_and_held_at_its_end(parts, tmp_path):
    import folder_paths

    model, _, positive = parts
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    try:
        make_clip(tmp_path / "hint.mp4", frames=7, size=(64, 64), fps=7, tone=False)
        decoded = torch.from_numpy(read_back(tmp_path / "hint.mp4")[0]).float() / 255
        provider = FrameSteering(model, positive, None, SteeringChoice(control_hint=HINT_VIDEO,
                                                                             hint_file="hint.mp4"),
                                    skip_first=1, every_nth=2)
        given = [provider(Frame(frame, index=i)).hint[0] for i, frame in enumerate(frames(5))]
        provider.close()
    finally:
        folder_paths.set_input_directory(old)
    for got, source in zip(given, (1, 3, 5, 5, 5)):  # source frames 1, 3, 5, then the last one held
        assert (got - decoded[source]).abs().max() < 2 / 255, source
    assert any("hint video ended after 3 frames" in line for line in provider.report())


def test_prompt_schedule_encodes_each_keyframe_once_and_blends_per_frame(parts):
    model, clip, positive = parts
    before = [[t.clone(), dict(d)] for t, d in positive]
    clip.encodes.clear()
    provider = FrameSteering(model, positive, clip, SteeringChoice(prompt_schedule="0: watercolor\n4: oil"))
    given = [provider(Frame(frame, index=i)).positive for i, frame in enumerate(frames(8))]
    assert len(clip.encodes) == 2  # one per keyframe, not one per frame
    water, oil = given[0][0][0], given[4][0][0]
    assert torch.allclose(given[2][0][0], lerp_tokens(water, oil, 0.5))
    assert torch.allclose(given[1][0][0], lerp_tokens(water, oil, 0.25))
    assert given[4] is given[5] is given[7]  # the same list while the prompt holds (the engine prepares it once)
    for frame_positive in given:  # the run's structure: the same ControlNet chain, the run's options
        assert frame_positive[0][1]["control"] is positive[0][1]["control"]
    for (t, d), (t0, d0) in zip(positive, before):  # the run's own conditioning is unchanged
        assert torch.equal(t, t0) and d.keys() == d0.keys() and d["control"] is d0["control"]
    assert "prompt schedule: 2 keyframes" in provider.report()


def test_live_prompt_blends_in_over_n_frames_with_one_encode(parts):
    model, clip, positive = parts
    session = SESSIONS.get("cond_live")
    provider = FrameSteering(model, positive, clip, SteeringChoice(), session)
    clip.encodes.clear()
    stream = frames(9)
    assert [provider(Frame(stream[i], index=i)) for i in range(3)] == [None, None, None]  # nothing to carry yet
    session.params.offer({"prompt": "oil painting", "blend_frames": 4})
    given = [provider(Frame(stream[i], index=i)).positive[0][0] for i in range(3, 9)]
    assert len(clip.encodes) == 1
    own, target = positive[0][0], given[-1]
    for k, tokens in enumerate(given[:4]):  # frames 3..6: 1/4, 2/4, 3/4, then all of the new prompt
        assert torch.allclose(tokens, lerp_tokens(own, target, (k + 1) / 4)), k
    assert torch.equal(given[3], target)
    session.params.offer({"control_strength": 0.5, "ff_alpha": 0.2})
    given = provider(Frame(stream[0], index=9))
    assert given.control_scale == 0.5 and given.fusion_alpha == 0.2
    report = " | ".join(provider.report())
    assert "2 live changes (frame 3: prompt 'oil painting' (blend 4 frames); frame 9: control strength 0.5, " \
           "FF alpha 0.2)" in report and "1 CLIP encodes" in report
    provider.close()
    with pytest.raises(LookupError, match="no loop is running"):
        session.params.offer({"ff_alpha": 0.3})


@pytest.mark.parametrize("body, message", [
    ([1], "send a JSON object"),
    ({"promt": "x"}, "unknown field(s) 'promt'"),
    ({"prompt": ""}, "prompt must be text of 1 to 4000"),
    ({"prompt": 5}, "prompt must be text"),
    ({"control_strength": 11}, "control_strength must be a number from 0 to 10, got 11"),
    ({"control_strength": float("nan")}, "control_strength must be a number"),
    ({"ff_alpha": "0.5"}, "ff_alpha must be a number from 0 to 1"),
    ({"blend_frames": 2.5}, "blend_frames must be a whole number from 0 to 1000"),
    ({"clear_bank": "yes"}, "clear_bank must be true or false"),
    ({}, "nothing to change"),
    ({"prompt": "abc \ud800 def"}, "prompt holds a character no text encoder can take (a lone surrogate U+D800"),
    ({"prompt": "abc\x1b[2Jdef"}, "prompt holds the control character U+001B"),
    ({"prompt": "(a watercolor painting:nan)"}, "prompt: the weight of '(a watercolor painting:nan)' is nan"),
    ({"prompt": "(a:inf)"}, "the weight of '(a:inf)' is inf"),
    ({"prompt": "(a:1e308)"}, "a weight must be a number from -10 to 10"),
    ({"prompt": "(" * 1900 + "a" + ")" * 1900}, "prompt: the weight of"),  # ComfyUI: a RecursionError
])
def test_bad_live_values_are_refused_with_the_rule(body, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_change(body, Capabilities(clip=True, control=True, fusion=True, bank=True))


def test_live_changes_the_loop_cannot_make_are_refused():
    can = Capabilities()
    for body, message in (({"prompt": "x"}, "no CLIP connected"), ({"control_strength": 1}, "no ControlNet"),
                          ({"ff_alpha": 0.5}, "no StreamV2V Feature Fusion"), ({"clear_bank": True}, "no feature bank")):
        with pytest.raises(ValueError, match=message):
            parse_change(body, can)


def test_choices_the_inputs_cannot_serve_are_refused_before_any_work(parts):
    model, clip, positive = parts
    plain = tiny_models.encode_prompt(clip.clip, "no controlnet")
    with pytest.raises(ValueError, match="needs the checkpoint's CLIP connected"):
        FrameSteering(model, positive, None, SteeringChoice(prompt_schedule="0: a"))
    with pytest.raises(ValueError, match="needs a ControlNet in the positive conditioning"):
        FrameSteering(model, plain, None, SteeringChoice(control_hint=HINT_CANNY))
    with pytest.raises(ValueError, match="needs a video: pick 'hint_file'"):
        FrameSteering(model, positive, None, SteeringChoice(control_hint=HINT_VIDEO))
    with pytest.raises(ValueError, match="line 2"):
        FrameSteering(model, positive, clip, SteeringChoice(prompt_schedule="0: a\nb"))


def test_a_live_prompt_reaches_the_output_of_the_next_frame_through_the_engine(parts):
    """Through the real engine (stream batch, 2 steps): a prompt sent while frame 5 enters changes output 5 on, and
    not one output before it; every frame comes out; one CLIP encode."""
    from streamv2v.nodes.engine import StreamSettings, run_stream

    model, clip, positive = parts
    vae = tiny_models.tiny_taesd_vae(0)
    stream = frames(10, seed=11)
    settings = StreamSettings(steps=2, strength=0.5)

    def run(change_at=None):
        session = SESSIONS.get("cond_engine")
        provider = FrameSteering(model, positive, clip, SteeringChoice(blend_frames=3), session)
        outputs = {}

        def source():
            for i, frame in enumerate(stream):
                if i == change_at:
                    session.params.offer({"prompt": "oil painting"})
                yield frame
        run_stream(model, positive, positive, vae, source(), settings, provider.watch(lambda out: outputs.__setitem__(out.index, out.image)),
                   conditioning=provider)
        provider.close()
        return [outputs[i] for i in range(len(stream))], session.params.status()

    clip.encodes.clear()
    plain, _ = run()
    changed, status = run(change_at=5)
    assert len(clip.encodes) == 1 and status["log"] == [{"frame": 5, "change": "prompt 'oil painting'"}]
    # Not bit-equal: the second run reads its (cleared, fully masked) bank where the first had none yet, the same
    # attention through another kernel path (rounding only, far below what a prompt changes)
    for i in range(5):
        assert (plain[i] - changed[i]).abs().max() < 1e-5, f"output {i} changed before the prompt did"
    for i in range(5, 10):
        assert (plain[i] - changed[i]).abs().max() > 1e-3, f"output {i} did not follow the new prompt"


def test_live_sampling_fields_and_negative_prompt_reach_each_frame(parts):
    """Seed (blended), strength, cfg, delta and a negative prompt, as the steering hands them to the engine."""
    from streamv2v.nodes.engine import StreamSettings
    from streamv2v.streamv2v_core.stream.noise import SeedBlend

    model, clip, positive = parts
    session = SESSIONS.get("cond_sampling")
    settings = StreamSettings(seed=5, guidance="residual self-negative")
    provider = FrameSteering(model, positive, clip, SteeringChoice(blend_frames=2), session, negative=positive,
                             settings=settings)
    stream = frames(5)
    assert provider(Frame(stream[0], index=0)) is None
    session.params.offer({"seed": 9, "strength": 0.6, "cfg": 2.0, "residual_delta": 0.5,
                          "negative_prompt": "blurry"})
    given = [provider(Frame(stream[i], index=i)) for i in range(1, 4)]
    assert [g.seed for g in given] == [SeedBlend(5, 9, 0.5), 9, 9]  # blended over 2 frames from the node's seed
    assert {(g.strength, g.cfg, g.residual_delta) for g in given} == {(0.6, 2.0, 0.5)}
    assert given[0].negative is not None and given[0].positive is None  # the negative blends in, the positive stays
    assert provider.current()["negative_prompt"] == "blurry" and provider.current()["seed"] == 9
    provider.close()
    with pytest.raises(ValueError, match="residual_delta acts only with a residual guidance"):
        parse_change({"residual_delta": 0.5}, Capabilities())


def test_a_take_replays_its_changes_at_their_frames(parts):
    model, clip, positive = parts
    provider = FrameSteering(model, positive, clip, SteeringChoice(blend_frames=0), SESSIONS.get("cond_replay"))
    provider.replay = {2: [parse_change({"strength": 0.7}, provider.can)]}
    stream = frames(4)
    given = [provider(Frame(stream[i], index=i)) for i in range(4)]
    assert given[:2] == [None, None] and given[2].strength == 0.7 and given[3].strength == 0.7
    assert provider.session.params.status()["log"] == [{"frame": 2, "change": "strength 0.7"}]
    provider.close()


def test_an_applied_zero_is_answered_as_applied():
    can = Capabilities(clip=True, control=True, fusion=True, bank=True)
    change = parse_change({"ff_alpha": 0, "blend_frames": 0, "control_strength": 0, "clear_bank": False}, can)
    assert change.fields() == {"blend_frames": 0, "control_strength": 0.0, "ff_alpha": 0.0}
    assert change.describe() == "blend frames 0, control strength 0, FF alpha 0"


def test_bodies_the_json_parser_cannot_take_are_refused_with_the_reason():
    for data, message in ((b"[" * 30_000, "nests too deeply"), (b'{"prompt": "\xff"}', "not UTF-8"),
                          (b"not json", "the body is not JSON")):
        with pytest.raises(ValueError, match=message):
            read_json(data)
    assert read_json(b'{"prompt": "abc \\ud800"}') == {"prompt": "abc \ud800"}  # JSON carries it: parse_change refuses


def test_pending_changes_coalesce_the_newest_wins_and_the_others_are_reported():
    params = LiveParams()
    params.begin(Capabilities(clip=True, fusion=True, bank=True), {})
    for i in range(200):
        params.offer({"prompt": f"p{i}"})
    params.offer({"ff_alpha": 0.0, "blend_frames": 2})
    params.offer({"clear_bank": True})
    params.offer({"ff_alpha": 0.4})
    taken = params.take()
    assert taken == [Change(prompt="p199", blend_frames=2, ff_alpha=0.4, clear_bank=True)] and params.take() == []
    params.applied(3, taken[0], {})
    status = params.status()
    assert status["superseded"] == 199 and status["pending"] == 0 and status["log"] == [
        {"frame": 3, "change": "prompt 'p199' (blend 2 frames), FF alpha 0.4, bank cleared (superseding 'p196', "
                               "'p197', 'p198')"}]


def test_changes_no_frame_took_are_reported_as_discarded():
    params = LiveParams()
    params.begin(Capabilities(fusion=True), {})
    params.offer({"ff_alpha": 0.2})
    params.end()
    status = params.status()
    assert not status["running"] and status["discarded"] == 1 and status["log"] == [
        {"frame": None, "problem": "discarded (the loop ended before a frame took it): FF alpha 0.2"}]


def test_a_flood_of_prompt_changes_costs_at_most_one_encode_a_frame(parts):
    """16 prompts sent before each of 12 frames: 12 encodes (the newest prompt of each frame), 180 superseded."""
    model, clip, positive = parts
    session = SESSIONS.get("cond_flood")
    provider = FrameSteering(model, positive, clip, SteeringChoice(blend_frames=0), session)
    clip.encodes.clear()
    for frame, image in enumerate(frames(12)):
        for k in range(16):
            session.params.offer({"prompt": f"style {frame} {k}"})
        provider(Frame(image, index=frame))
    status = session.params.status()
    provider.close()
    assert len(clip.encodes) == 12 and status["changes"] == 12 and status["superseded"] == 12 * 15
    assert status["current"]["prompt"] == "style 11 15"


class FailingClip(CountingClip):
    """A CLIP that fails on texts holding 'boom' (as the tokenizer did on a lone surrogate: a TypeError) and
    encodes texts holding 'nan' to NaN (as a NaN weight did)."""

    def tokenize(self, text):
        if "boom" in text:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return {**self.clip.tokenize(text), "nan": "nan" in text}

    def encode_from_tokens_scheduled(self, tokens):
        spoil = tokens.pop("nan")
        encoded = super().encode_from_tokens_scheduled(tokens)
        return [[encoded[0][0] * float("nan"), encoded[0][1]]] if spoil else encoded


def test_a_prompt_the_encoder_still_fails_on_keeps_the_prompt_and_says_so(parts):
    """If a checked prompt still fails at the frame (encoder error, non-finite embedding), the frame keeps the prompt
    in effect, the rest of the change applies, the panel's log and the report say so; a keyframe alike."""
    model, _, positive = parts
    session = SESSIONS.get("cond_failing")
    steering = FrameSteering(model, positive, FailingClip(), SteeringChoice(blend_frames=0), session)
    stream = frames(6)
    session.params.offer({"prompt": "oil painting"})
    oil = steering(Frame(stream[0], index=0)).positive
    session.params.offer({"prompt": "boom", "ff_alpha": 0.3})
    given = steering(Frame(stream[1], index=1))
    assert given.positive is oil and given.fusion_alpha == 0.3 and steering.live_prompt == "oil painting"
    session.params.offer({"prompt": "a nan painting"})
    assert steering(Frame(stream[2], index=2)).positive is oil
    status = session.params.status()
    assert status["problems"] == 2 and [e.get("problem", e.get("change")) for e in status["log"]] == [
        "prompt 'oil painting'",
        "prompt 'boom' not applied (the text encoder: TypeError: TextEncodeInput must be Union[TextInputSequence, "
        "Tuple[InputSequence, InputSequence]]): the prompt stays 'oil painting'", "FF alpha 0.3",
        "prompt 'a nan painting' not applied (the text encoder: its embedding is not finite (NaN or inf)): the "
        "prompt stays 'oil painting'"]
    assert "WARNING: 2 live problems (frame 1: prompt 'boom' not applied" in " | ".join(steering.report())
    steering.close()
    scheduled = FrameSteering(model, positive, FailingClip(), SteeringChoice(prompt_schedule="0: a photo\n2: boom"),
                              session)
    given = [scheduled(Frame(stream[i], index=i)).positive[0][0] for i in range(5)]
    assert torch.equal(given[4], given[0]) and session.params.status()["log"] == [
        {"frame": 1, "problem": "prompt schedule keyframe 2 not applied (the text encoder: TypeError: TextEncodeInput "
                                "must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]): the prompt "
                                "before it is kept"}]
    scheduled.close()
