"""Keyframed prompts for a video (pure torch): parse a schedule, blend encoded prompts per frame.

A schedule is text with one ``frame: prompt`` per keyframe, the format batch prompt-schedule nodes
use (FizzNodes' ``"0": "watercolor", "120": "oil painting"`` with quotes and commas is read too)::

    0: watercolor
    120: oil painting

Frames before the first keyframe take its prompt, frames after the last take the last one, and a
frame between two keyframes gets the linear blend of their *encoded* prompts (what those nodes do).
Only the keyframes are ever encoded (one text-encoder call each); a frame's blend is made when the
frame needs it, so a 10,000-frame video never holds more than the keyframes' embeddings.

A CONDITIONING here is ComfyUI's plain data: ``[[cond Tensor[1, T, C], {"pooled_output":
Tensor[1, P], ...}], ...]`` (lists, dicts and tensors: nothing from ComfyUI is imported).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

MAX_KEYFRAMES = 256        # a schedule is typed by hand; more is a mistake (or an attack on the server)
MAX_PROMPT_CHARS = 4000    # per keyframe
MAX_FRAME = 100_000_000    # as the loop's max_frames
# a quoted prompt may be followed by another entry on the same line; an unquoted one runs to the line's end
# (prompts hold commas: "watercolor, soft light")
_ENTRY = re.compile(r'\s*"?\s*(\d+)\s*"?\s*:\s*(?:("(?:[^"\\]|\\.)*")\s*(?:,|$)|(.*)$)')


@dataclass(frozen=True)
class Keyframe:
    """From ``frame`` on, the prompt is ``text`` (until the next keyframe, blending towards it)."""

    frame: int
    text: str


def parse_schedule(text: str) -> list[Keyframe]:
    """Keyframes of a schedule, sorted by frame; ``[]`` for blank text.

    ValueError naming the line at fault for anything that is not ``frame: prompt``, a frame
    given twice, an empty prompt, or more than ``MAX_KEYFRAMES`` keyframes.
    """
    found: dict[int, str] = {}
    for number, line in enumerate(str(text).splitlines(), 1):
        position = 0
        # FizzNodes' text is often pasted with its JSON-like braces
        line = line.strip().removeprefix("{").removesuffix("}").strip().rstrip(",").strip()
        if not line:
            continue
        while position < len(line):
            match = _ENTRY.match(line, position)
            if match is None or match.end() == position:
                raise ValueError(f"prompt schedule line {number}: {line[:60]!r} is not 'frame: prompt' "
                                 f"(e.g. '0: watercolor' then '120: oil painting' on the next line)")
            prompt = _unquote(match.group(2)) if match.group(2) is not None else match.group(3).strip()
            _add(found, int(match.group(1)), prompt, number)
            position = match.end()
    return [Keyframe(frame, found[frame]) for frame in sorted(found)]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = re.sub(r"\\(.)", r"\1", value[1:-1])
    return value.strip()


def _add(found: dict[int, str], frame: int, prompt: str, line: int) -> None:
    if frame > MAX_FRAME:
        raise ValueError(f"prompt schedule line {line}: frame {frame} is past the last possible frame ({MAX_FRAME})")
    if frame in found:
        raise ValueError(f"prompt schedule line {line}: frame {frame} is given twice (one prompt per keyframe)")
    if not prompt:
        raise ValueError(f"prompt schedule line {line}: frame {frame} has no prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt schedule line {line}: the prompt has {len(prompt)} characters "
                         f"(at most {MAX_PROMPT_CHARS})")
    if len(found) >= MAX_KEYFRAMES:
        raise ValueError(f"prompt schedule: more than {MAX_KEYFRAMES} keyframes")
    found[frame] = prompt


def blend_position(keyframes: list[Keyframe], frame: int) -> tuple[int, int, float]:
    """(i, j, w): frame ``frame`` is ``(1 - w) * keyframe i + w * keyframe j`` (indices into ``keyframes``).

    ``w`` is 0 on a keyframe, before the first and after the last (then ``i == j``).
    """
    if not keyframes:
        raise ValueError("empty prompt schedule")
    later = next((j for j, key in enumerate(keyframes) if key.frame > frame), None)
    if later is None:
        last = len(keyframes) - 1
        return last, last, 0.0
    if later == 0:
        return 0, 0, 0.0
    start, end = keyframes[later - 1].frame, keyframes[later].frame
    weight = (frame - start) / (end - start)
    return (later - 1, later, weight) if weight > 0 else (later - 1, later - 1, 0.0)


def lerp_tokens(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - weight) * a + weight * b`` for text embeddings ``[1, Ta, C]`` and ``[1, Tb, C]``.

    Prompts longer than 77 tokens give 154, 231, ... tokens. Different lengths are first repeated
    to their least common multiple, as ComfyUI does when it batches them (``CONDCrossAttn.concat``):
    repeating every token the same number of times leaves cross-attention unchanged.
    """
    if a.shape[1] != b.shape[1]:
        common = math.lcm(a.shape[1], b.shape[1])
        a, b = a.repeat(1, common // a.shape[1], 1), b.repeat(1, common // b.shape[1], 1)
    return torch.lerp(a, b.to(a.dtype), float(weight))


def blend_entry(a: list, b: list, weight: float) -> list:
    """One CONDITIONING entry ``[cond, dict]`` between ``a`` (weight 0) and ``b`` (weight 1).

    The tokens and every tensor option both entries hold with the same shape (``pooled_output``)
    are blended; other options are taken from ``b`` once ``weight`` reaches 0.5, else from ``a``.
    New list and dict: neither input is changed.
    """
    if weight <= 0.0:
        return [a[0], dict(a[1])]
    if weight >= 1.0:
        return [b[0], dict(b[1])]
    options = dict(b[1] if weight >= 0.5 else a[1])
    for key, value in a[1].items():
        other = b[1].get(key)
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value.shape == other.shape \
                and value.is_floating_point():
            options[key] = torch.lerp(value, other.to(value.dtype), float(weight))
    return [lerp_tokens(a[0], b[0], weight), options]
