"""What each frame of a loop carries besides its pixels: prompt (schedule or live), ControlNet hint, strengths.

``FrameSteering`` is the stream engine's ``conditioning`` callable: called once per frame as the
frame enters the stream, it returns that frame's ``FrameConditioning`` (or None: the run's own). It

* blends a keyframed prompt schedule (each keyframe encoded once with the connected CLIP, the blend
  made per frame: never a tensor per frame held for the whole video),
* replaces the ControlNet hint frame by frame (canny, the frame, the previous output, a hint video),
* applies live changes (``session.params``: prompt blended in over N frames, one CLIP encode per
  change; ControlNet strength; FF alpha; clearing the bank) to the frame entering when they arrive.

Nothing a change carries ends the run: a prompt the text encoder still fails on (or that encodes to
values that are not finite) leaves the prompt in effect as it was, and the panel and the report say so;
an output that came out not finite is reported there too (the engine showed the last good frame).

The run's own CONDITIONING and ControlNet objects are never changed: a frame's positive is a new list
of new ``[tokens, dict]`` entries with the run's structure (same entries, same ControlNet chain), and
the same list object is returned while the prompt does not change (the engine prepares a list once).
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, replace
from typing import Callable

import torch
from comfy_api.latest import io

import comfy.model_management

from ...streamv2v_core.bank.patches import FeatureFusion
from ...streamv2v_core.live.params import MAX_BLEND_FRAMES, Capabilities, Change
from ...streamv2v_core.live.sampling_track import SamplingTrack
from ...streamv2v_core.media.frames import fit_to, select_frames
from ...streamv2v_core.media.hints import PreviousOutput, as_hint, canny
from ...streamv2v_core.media.video_io import VideoFileSource
from ...streamv2v_core.stream.conditioning import FrameConditioning
from ...streamv2v_core.stream.frame import Frame, Output
from ...streamv2v_core.stream.guidance import FULL
from ...streamv2v_core.stream.prompt_schedule import blend_entry, blend_position, parse_schedule
from ..engine import banks_of
from ..input_files import input_choices, resolve_input
from ..video_input import open_video

log = logging.getLogger("streamv2v")

HINT_NONE, HINT_CANNY, HINT_FRAME = "none", "canny (OpenCV)", "the frame (tile / recolour)"
HINT_PREVIOUS, HINT_VIDEO = "previous output (TemporalNet)", "hint video"
HINT_CHOICES = (HINT_NONE, HINT_CANNY, HINT_FRAME, HINT_PREVIOUS, HINT_VIDEO)
KEYFRAME_CACHE = 4  # encoded keyframes kept: the two being blended and their neighbours


@dataclass(frozen=True)
class SteeringChoice:
    """The loop's per-frame steering inputs (prompt schedule, ControlNet hint, live blend)."""

    prompt_schedule: str = ""
    control_hint: str = HINT_NONE
    hint_file: str = ""
    blend_frames: int = 8


def steering_inputs() -> list:
    """clip, prompt_schedule, control_hint, hint_file, hint_video, blend_frames (all optional)."""
    return [
        io.Clip.Input("clip", optional=True,
                      tooltip="The checkpoint's CLIP: encodes the prompt schedule's keyframes and prompts typed "
                              "live in the node's panel (once per prompt, not per frame)."),
        io.String.Input("prompt_schedule", default="", multiline=True, optional=True,
                        tooltip="Keyframed prompts, one 'frame: prompt' per line (e.g. '0: watercolor' and "
                                "'120: oil painting'; FizzNodes' quoted format works too): frames between two "
                                "keyframes get the blend of both, frame numbers count the frames this loop runs. "
                                "Needs 'clip'. Empty: the positive conditioning as it is."),
        io.Combo.Input("control_hint", options=list(HINT_CHOICES), default=HINT_NONE, optional=True,
                       tooltip="Per-frame hint for the ControlNet(s) in the conditioning (apply one with core "
                               "'Apply ControlNet' and any image as a placeholder): canny edges of each frame "
                               "(OpenCV), the frame itself (tile / recolour ControlNets), the previous output "
                               "frame (TemporalNet-style), or a hint video aligned frame by frame. 'none': the "
                               "hint applied in the conditioning, for every frame."),
        io.Combo.Input("hint_file", options=input_choices(), optional=True, upload=io.UploadType.video,
                       tooltip="control_hint 'hint video': a video in ComfyUI's input folder, frame i the hint of "
                               "frame i (the loop's skip_first / every_nth apply to it too); or connect a VIDEO to "
                               "'hint_video'. When it ends, its last frame is held."),
        io.Video.Input("hint_video", optional=True,
                       tooltip="control_hint 'hint video': a VIDEO whose frame i is the hint of frame i (replaces "
                               "'hint_file')."),
        io.Int.Input("blend_frames", default=8, min=0, max=MAX_BLEND_FRAMES, optional=True,
                     tooltip="A prompt changed live is blended in over this many frames (0: at once)."),
    ]


def fusion_patches(model) -> list[FeatureFusion]:
    """The model's Feature Fusion patches."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    return [p for group in patches.values() for p in group if isinstance(p, FeatureFusion)]


def capabilities(model, positive: list, clip, guidance: str = FULL) -> Capabilities:
    """What live steering can change in this run."""
    control = any(entry[1].get("control") is not None for entry in positive)
    return Capabilities(clip=clip is not None, control=control, fusion=bool(fusion_patches(model)),
                        bank=bool(banks_of(model)), residual=guidance != FULL)


def check_choice(choice: SteeringChoice, can: Capabilities, hint_video=None) -> list:
    """The schedule's keyframes; ValueError naming the input at fault (before any work)."""
    if choice.control_hint not in HINT_CHOICES:
        raise ValueError(f"control_hint must be one of {HINT_CHOICES}, got {choice.control_hint!r}")
    keyframes = parse_schedule(choice.prompt_schedule or "")
    if keyframes and not can.clip:
        raise ValueError("prompt_schedule needs the checkpoint's CLIP connected to the loop's 'clip' input "
                         "(it encodes each keyframe)")
    if choice.control_hint != HINT_NONE and not can.control:
        raise ValueError(f"control_hint {choice.control_hint!r} needs a ControlNet in the positive conditioning: "
                         f"apply one with core 'Apply ControlNet' (any image as a placeholder hint), or set "
                         f"control_hint to 'none'")
    if choice.control_hint == HINT_VIDEO and hint_video is None and not str(choice.hint_file or "").strip():
        raise ValueError("control_hint 'hint video' needs a video: pick 'hint_file' or connect 'hint_video'")
    return keyframes


class PromptNotEncoded(ValueError):
    """The text encoder failed on a text, or gave values that are not finite."""


class PromptTrack:
    """The text part of each frame's positive: the run's own, a schedule, or a live prompt blended in.

    Entries are ``[tokens Tensor[1, T, C], {"pooled_output": Tensor[1, P], ...}]`` as a CLIP gives them.
    """

    def __init__(self, positive: list, clip, keyframes: list, blend_frames: int):
        self.positive, self.clip, self.keyframes = positive, clip, keyframes
        self.blend_frames = blend_frames
        self.encodes = 0
        self._keyframe_cache: collections.OrderedDict[int, list] = collections.OrderedDict()
        self._live: tuple[list, list, int] | None = None  # (from entry, to entry, frame the blend starts)
        self._live_words: tuple[str, str] = ("", "")  # (what the last frame had, the new prompt), in words
        self._last_entry: list | None = None
        self._last_positive: list | None = None
        self.problems: list[str] = []  # keyframes that could not be encoded (the steering reports and empties it)
        self._last_words: str | None = None

    def encode(self, text: str) -> list:
        """One CLIP encode (as core CLIPTextEncode): the first entry ``[tokens [1, T, C], options]``;
        ``PromptNotEncoded`` if the encoder fails or its embedding is not finite (one host read per encode)."""
        self.encodes += 1
        try:
            encoded = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
            tokens, options = encoded[0][0], encoded[0][1]
        except comfy.model_management.InterruptProcessingException:
            raise
        except Exception as error:  # whatever the tokenizer or encoder raise on a text, the show goes on
            raise PromptNotEncoded(f"{type(error).__name__}: {str(error)[:200]}") from error
        entry = [tokens[:1], {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in options.items()}]
        if not all(bool(torch.isfinite(t).all()) for t in (entry[0], *entry[1].values()) if torch.is_tensor(t)):
            raise PromptNotEncoded("its embedding is not finite (NaN or inf)")
        return entry

    def set_live(self, text: str, frame: int) -> None:
        """From ``frame`` on, blend from what the last frame had to ``text`` over ``blend_frames`` frames
        (``PromptNotEncoded``: nothing changes)."""
        self._live = (self._last_entry or self._own_entry(), self.encode(text), frame)
        self._live_words = (self._last_words or "the workflow's own prompt", _quoted(text))

    def words_for(self, frame: int) -> str | None:
        """Frame ``frame``'s prompt in words, for the panel ("keyframe 120: 'oil painting'"); None: the run's own."""
        if self._live is not None:
            before, after = self._live_words
            weight = self._live_weight(frame)
            words = after if weight >= 1.0 else f"{before} → {after} ({weight:.0%})"
        elif self.keyframes:
            i, j, weight = blend_position(self.keyframes, frame)
            a, b = self.keyframes[i], self.keyframes[j]
            words = f"keyframe {a.frame}: {_quoted(a.text)}" if weight == 0 else \
                f"keyframe {a.frame} {_quoted(a.text)} → {b.frame} {_quoted(b.text)} ({weight:.0%})"
        else:
            return None
        self._last_words = words
        return words

    def _live_weight(self, frame: int) -> float:
        """How far the live prompt's blend is at ``frame`` (1: done)."""
        first = self._live[2]
        return (frame - first + 1) / self.blend_frames if self.blend_frames > 1 else 1.0

    def positive_for(self, frame: int) -> list | None:
        """Frame ``frame``'s positive (the same list while the text does not change), or None: the run's own."""
        entry = self._entry_for(frame)
        if entry is None:
            return None
        if entry is not self._last_entry:
            self._last_entry = entry
            self._last_positive = [[entry[0], {**options, **_text_options(entry[1])}]
                                   for _, options in self.positive]
        return self._last_positive

    def _entry_for(self, frame: int) -> list | None:
        if self._live is not None:
            start, target, _ = self._live
            weight = self._live_weight(frame)
            return target if weight >= 1.0 else blend_entry(start, target, weight)
        if not self.keyframes:
            return None
        i, j, weight = blend_position(self.keyframes, frame)
        return self._keyframe(i) if weight == 0 else blend_entry(self._keyframe(i), self._keyframe(j), weight)

    def _keyframe(self, i: int) -> list:
        if i not in self._keyframe_cache:
            try:
                self._keyframe_cache[i] = self.encode(self.keyframes[i].text)
            except PromptNotEncoded as error:  # kept as the prompt in effect before it, so tried once
                self._keyframe_cache[i] = self._last_entry or self._own_entry()
                self.problems.append(f"prompt schedule keyframe {self.keyframes[i].frame} not applied (the text "
                                     f"encoder: {error}): the prompt before it is kept")
            while len(self._keyframe_cache) > KEYFRAME_CACHE:
                self._keyframe_cache.popitem(last=False)
        self._keyframe_cache.move_to_end(i)
        return self._keyframe_cache[i]

    def _own_entry(self) -> list:
        tokens, options = self.positive[0]
        pooled = options.get("pooled_output")
        return [tokens[:1], {"pooled_output": pooled[:1]} if isinstance(pooled, torch.Tensor) else {}]


def _quoted(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def _text_options(options: dict) -> dict:
    """The options a text encoder sets (the run's ControlNet chain, areas and masks are kept from the run)."""
    return {k: v for k, v in options.items() if k not in ("control", "control_apply_to_uncond")}


class HintSource:
    """Each frame's ControlNet hint ``[1, H, W, 3]`` (None for 'none'), from ``frame [H, W, 3]``."""

    def __init__(self, mode: str, reader=None, skip_first: int = 0, every_nth: int = 1):
        self.mode, self.reader = mode, reader
        self.previous = PreviousOutput() if mode == HINT_PREVIOUS else None
        self._frames = iter(select_frames(reader, skip_first, every_nth)) if reader is not None else None
        self._held: torch.Tensor | None = None
        self.given = 0
        self.ended_at: int | None = None  # the hint video ran out at this frame (its last frame held)

    def __call__(self, frame: torch.Tensor) -> torch.Tensor | None:
        hint = self._make(frame.detach().cpu())
        self.given += hint is not None
        return hint

    def _make(self, frame: torch.Tensor) -> torch.Tensor | None:
        if self.mode == HINT_CANNY:
            return canny(frame)
        if self.mode == HINT_FRAME:
            return as_hint(frame)
        if self.mode == HINT_PREVIOUS:
            return self.previous(frame)
        if self.mode == HINT_VIDEO:
            return self._video_hint(frame)
        return None

    def _video_hint(self, frame: torch.Tensor) -> torch.Tensor:
        if self.ended_at is None:
            item = next(self._frames, None)
            if item is None:
                self.ended_at = self.given
                log.warning("StreamV2V loop: the hint video ended after %d frames: its last frame is held",
                            self.given)
            else:
                self._held = as_hint(fit_to(item, *frame.shape[:2]))
        if self._held is None:
            raise ValueError("the hint video has no frames after skip_first / every_nth")
        if self._held.shape[1:3] != frame.shape[:2]:
            self._held = as_hint(fit_to(self._held[0], *frame.shape[:2]))
        return self._held

    def saw_output(self, image: torch.Tensor) -> None:
        if self.previous is not None:
            self.previous.saw(image)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def open_hint_reader(choice: SteeringChoice, hint_video=None):
    """The hint video's frame reader (``streamv2v_core.media.video_io`` protocol), or None for other hints."""
    if choice.control_hint != HINT_VIDEO:
        return None
    if hint_video is not None:
        return open_video(hint_video)
    return VideoFileSource(resolve_input(choice.hint_file))


class FrameSteering:
    """The engine's ``conditioning(frame) -> FrameConditioning | None`` for one loop run.

    ``watch(on_output)`` wraps the sink so the previous-output hint sees finished frames; ``report()``
    gives the lines for the loop's report; ``close()`` ends the run (the session stops taking changes).
    Frames are counted here (0 = the first frame this run streams): schedules and the log use that count.
    """

    def __init__(self, model, positive: list, clip, choice: SteeringChoice, session=None, hint_video=None,
                 skip_first: int = 0, every_nth: int = 1, negative: list | None = None, settings=None):
        self.can = capabilities(model, positive, clip, getattr(settings, "guidance", FULL))
        keyframes = check_choice(choice, self.can, hint_video)
        self.model, self.session = model, session
        self.prompt = PromptTrack(positive, clip, keyframes, choice.blend_frames)
        self.negative = PromptTrack(negative, clip, [], choice.blend_frames) if negative else None
        self.sampling, self.run_seed = SamplingTrack(), int(getattr(settings, "seed", 0))
        self.live_negative: str | None = None
        self.replay: dict[int, list[Change]] | None = None  # a take re-rendered: its changes by frame
        self.recorder = None  # a live take being recorded (live.take.TakeRecorder)
        self.hints = HintSource(choice.control_hint, open_hint_reader(choice, hint_video), skip_first, every_nth)
        self.control_scale, self.fusion_alpha = 1.0, None
        fusions = fusion_patches(model)
        self.own_alpha = fusions[0].alpha if fusions else None  # what FF alpha is until a live change
        self.live_prompt: str | None = None
        self.frames = 0
        self.steered = False  # a live change set a strength: every later frame carries it
        self.held = 0  # outputs that came out not finite (the engine showed the last good frame)
        self._holding = False
        if session is not None:
            session.params.begin(self.can, self.current())

    def current(self) -> dict:
        """The live values now (the panel shows them after a reload)."""
        s = self.sampling
        return {"blend_frames": self.prompt.blend_frames, "control_strength": self.control_scale,
                "ff_alpha": self.fusion_alpha if self.fusion_alpha is not None else self.own_alpha,
                "prompt": self.live_prompt, "negative_prompt": self.live_negative,
                "seed": s.seed_to, "strength": s.strength, "cfg": s.cfg, "residual_delta": s.residual_delta}

    def __call__(self, entering: Frame):
        """``entering`` (image ``[H, W, 3]``) enters the stream: its FrameConditioning (None: the run's own)."""
        frame, self.frames = self.frames, self.frames + 1
        for change in self._changes(frame):
            self._apply(change, frame)
        positive, hint = self.prompt.positive_for(frame), self.hints(entering.image)
        for problem in self.prompt.problems:
            self._problem(frame, problem)
        self.prompt.problems.clear()
        negative = self.negative.positive_for(frame) if self.negative is not None else None
        s = self.sampling
        seed = s.seed_for(frame)
        if positive is None and negative is None and hint is None and not self.steered and not s.steered:
            return None
        return FrameConditioning(positive=positive, negative=negative, hint=hint, control_scale=self.control_scale,
                                 fusion_alpha=self.fusion_alpha, strength=s.strength, seed=seed, cfg=s.cfg,
                                 residual_delta=s.residual_delta, label=self.prompt.words_for(frame))

    def _changes(self, frame: int) -> list[Change]:
        """The changes applied at ``frame``: a take's recorded ones, or what the session has waiting."""
        if self.replay is not None:
            return self.replay.pop(frame, [])
        return self.session.params.take() if self.session is not None else []

    def _apply(self, change: Change, frame: int) -> None:
        if change.blend_frames is not None:
            self.prompt.blend_frames = change.blend_frames
            if self.negative is not None:
                self.negative.blend_frames = change.blend_frames
        if change.prompt is not None:
            if self._set_text(self.prompt, change.prompt, frame, "prompt", self.live_prompt):
                self.live_prompt = change.prompt
            else:
                change = replace(change, prompt=None)
        if change.negative_prompt is not None and self.negative is not None:
            if self._set_text(self.negative, change.negative_prompt, frame, "negative prompt", self.live_negative):
                self.live_negative = change.negative_prompt
            else:
                change = replace(change, negative_prompt=None)
        if not change.fields():
            return
        if change.control_strength is not None:
            self.control_scale, self.steered = change.control_strength, True
        if change.ff_alpha is not None:
            self.fusion_alpha, self.steered = change.ff_alpha, True
        self.sampling.apply(change, frame, self.prompt.blend_frames, self.run_seed)
        if self.recorder is not None:
            self.recorder.change(frame, change)
        if change.clear_bank:
            for bank in banks_of(self.model):
                bank.reset(f"cleared live (session {self.session.name!r}, frame {frame})")
        log.info("StreamV2V session %r, frame %d: %s", self.session.name, frame, change.describe())
        self.session.params.applied(frame, change, self.current())

    def _set_text(self, track: PromptTrack, text: str, frame: int, label: str, now: str | None) -> bool:
        """Blend ``track`` to ``text`` from ``frame`` on; False (said in the panel and the report) when the text
        encoder still fails on it: the text in effect stays."""
        try:
            track.set_live(text, frame)
        except PromptNotEncoded as error:
            kept = repr(now) if now is not None else "the run's own"
            self._problem(frame, f"{label} {text[:60]!r} not applied (the text encoder: {error}): the {label} "
                                 f"stays {kept}")
            return False
        return True

    def _problem(self, frame: int, text: str) -> None:
        log.warning("StreamV2V loop, frame %d: %s", frame, text)
        if self.session is not None:
            self.session.params.problem(frame, text)

    def watch(self, on_output: Callable[[Output], None]) -> Callable[[Output], None]:
        """``on_output(Output)`` that also shows each finished frame to the previous-output hint, and tells the
        panel when outputs start coming out not finite."""
        def put(out: Output) -> None:
            if out.held:
                self.held += 1
                if not self._holding and self.session is not None:
                    self.session.params.problem(out.index, "the frame came out not finite (NaN/inf): the last good "
                                                           "frame is shown and the bank was cleared")
            self._holding = out.held
            self.hints.saw_output(out.image)
            on_output(out)
        return put

    def report(self) -> list[str]:
        lines = []
        if self.prompt.keyframes:
            lines.append(f"prompt schedule: {len(self.prompt.keyframes)} keyframes")
        if self.hints.mode != HINT_NONE:
            lines.append(f"ControlNet hint per frame: {self.hints.mode} ({self.hints.given} frames)")
        if self.hints.ended_at is not None:
            lines.append(f"WARNING: the hint video ended after {self.hints.ended_at} frames; its last frame "
                         f"was held")
        if self.held:
            lines.append(f"WARNING: {self.held} frames came out not finite (NaN/inf): each was replaced by the "
                         f"last good frame and the bank cleared")
        lines += self._params_report()
        if self.prompt.encodes:
            lines.append(f"{self.prompt.encodes} CLIP encodes")
        return lines

    def _params_report(self) -> list[str]:
        if self.session is None:
            return []
        params, lines = self.session.params.status(), []
        applied = [e for e in params["log"] if "change" in e]
        if params["changes"]:
            shown = "; ".join(f"frame {e['frame']}: {e['change']}" for e in applied[-10:])
            lines.append(f"{params['changes']} live changes ({shown})")
        if params["superseded"]:
            lines.append(f"{params['superseded']} live prompts superseded by a newer one before any frame used them")
        problems = [e for e in params["log"] if "problem" in e]
        if problems:
            shown = "; ".join(f"frame {e['frame']}: {e['problem']}" if e["frame"] is not None else e["problem"]
                              for e in problems[-5:])
            lines.append(f"WARNING: {params['problems'] + params['discarded']} live problems ({shown})")
        return lines

    def close(self) -> None:
        self.hints.close()
        if self.session is not None:
            self.session.params.end()
