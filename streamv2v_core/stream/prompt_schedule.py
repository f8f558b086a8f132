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

from .prompt_text import check_prompt

MAX_KEYFRAMES = 256        # a schedule is typed by hand; more is a mistake (or an attack on the server)
MAX_PROMPT_CHARS = 4000    # per keyframe
MAX_FRAME = 100_000_000    # as the loop's max_frames
MAX_REPEAT = 4             # a blend repeats prompts to a common length only up to this (as ComfyUI's sampler)
FORMAT = "'frame: prompt' (e.g. '0: watercolor' then '120: oil painting' on the next line)"
_FRAME = re.compile(r'\s*(?:"([0-9]+)"|([0-9]+))\s*:\s*')     # 12: or "12":
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"\s*')               # "a \"quoted\" prompt"


@dataclass(frozen=True)
class Keyframe:
    """From ``frame`` on, the prompt is ``text`` (until the next keyframe, blending towards it)."""

    frame: int
    text: str


def parse_schedule(text: str) -> list[Keyframe]:
    """Keyframes of a schedule, sorted by frame; ``[]`` for blank text.

    ValueError naming the line at fault for anything that is not ``frame: prompt`` (text left
    after a quoted prompt, an unclosed quote, a frame number past ``MAX_FRAME``), a frame given
    twice, an empty prompt, a prompt no text encoder can take (``prompt_text.check_prompt``), or
    more than ``MAX_KEYFRAMES`` keyframes.
    """
    found: dict[int, str] = {}
    for number, line in enumerate(str(text).splitlines(), 1):
        # FizzNodes' text is often pasted with its JSON-like braces
        line = line.strip().removeprefix("{").removesuffix("}").strip().rstrip(",").strip()
        for frame, prompt in _entries(line, number):
            _add(found, frame, prompt, number)
    return [Keyframe(frame, found[frame]) for frame in sorted(found)]


def _entries(line: str, number: int):
    """(frame, prompt) of each entry of one line: ``12: text`` (to the line's end) or quoted
    ``"12": "text"`` entries separated by commas."""
    position = 0
    while position < len(line):
        head = _FRAME.match(line, position)
        if head is None:
            raise ValueError(f"prompt schedule line {number}: {line[position:position + 60]!r} is not {FORMAT}")
        frame, position = _frame_number(head.group(1) or head.group(2), number), head.end()
        if not line.startswith('"', position):
            prompt = line[position:].strip()
            if '"' in prompt:
                raise ValueError(f"prompt schedule line {number}: the prompt {prompt[:60]!r} holds a quote but is "
                                 f"not quoted: quote the whole prompt (\\\" inside it) or remove the quote")
            yield frame, prompt
            return
        quoted = _QUOTED.match(line, position)
        if quoted is None:
            raise ValueError(f"prompt schedule line {number}: the quoted prompt {line[position:position + 60]!r} "
                             f"is not closed")
        yield frame, re.sub(r'\\(["\\])', r"\1", quoted.group(1)).strip()
        position = quoted.end()
        if position < len(line) and line[position] != ",":
            raise ValueError(f"prompt schedule line {number}: {line[position:position + 60]!r} after the quoted "
                             f"prompt is not understood: put each entry on its own line or separate them with ','")
        position += 1


def _frame_number(digits: str, line: int) -> int:
    if len(digits.lstrip("0")) > len(str(MAX_FRAME)):  # before int(): thousands of digits cost time
        raise ValueError(f"prompt schedule line {line}: the frame number has {len(digits)} digits, past the last "
                         f"possible frame ({MAX_FRAME})")
    return int(digits)


def _add(found: dict[int, str], frame: int, prompt: str, line: int) -> None:
    if frame > MAX_FRAME:
        raise ValueError(f"prompt schedule line {line}: frame {frame} is past the last possible frame ({MAX_FRAME})")
    if frame in found:
        raise ValueError(f"prompt schedule line {line}: frame {frame} is given twice (one prompt per keyframe)")
    if not prompt:
        raise ValueError(f"prompt schedule line {line}: frame {frame} has no prompt")
    found[frame] = check_prompt(prompt, f"prompt schedule line {line}", MAX_PROMPT_CHARS)
    if len(found) > MAX_KEYFRAMES:
        raise ValueError(f"prompt schedule: more than {MAX_KEYFRAMES} keyframes")


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

    Prompts longer than 77 tokens give 154, 231, ... tokens; two lengths are first brought to
    one (``common_length``).
    """
    if a.shape[1] != b.shape[1]:
        length = common_length(a.shape[1], b.shape[1])
        a, b = _tiled(a, length), _tiled(b, length)
    return torch.lerp(a, b.to(a.dtype), float(weight))


def common_length(a: int, b: int) -> int:
    """The token count two prompts of ``a`` and ``b`` tokens are blended at: never more than ``MAX_REPEAT``
    times the longer, so a blend costs at most that many times what the longer prompt costs, whatever the
    two lengths.

    Their least common multiple when it is at most ``MAX_REPEAT`` times the shorter (as ComfyUI's sampler
    batches conds, ``CONDCrossAttn.can_concat``): each is repeated a whole number of times, which leaves
    cross-attention exactly as it is. Beyond that (e.g. 160 and 159 chunks: 25,440 chunks), the longer
    length: the shorter is tiled to it (whole 77-token chunks when both are whole chunks), so some of its
    chunks count once more than others; nothing is zero-padded.
    """
    shorter, longer = sorted((a, b))
    common = math.lcm(a, b)
    return common if common <= MAX_REPEAT * shorter else longer


def _tiled(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``tokens`` ``[1, T, C]`` repeated to ``[1, length, C]`` (cut after the last whole repeat)."""
    count = tokens.shape[1]
    if count == length:
        return tokens
    return tokens.repeat(1, -(-length // count), 1)[:, :length]


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
