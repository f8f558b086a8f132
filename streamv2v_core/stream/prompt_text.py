"""What a prompt's text may hold before a text encoder sees it (pure Python).

A running show encodes prompts typed live and keyframes of a schedule; whatever the text holds
must not end, stall or blacken it. So before a text is accepted:

* it must be encodable: a lone surrogate (``"\\ud800"``, which JSON can carry) makes the
  tokenizer raise a TypeError; control characters (other than tab and line breaks) are never
  part of a prompt and would forge log lines;
* every weight in ComfyUI's prompt syntax must be a finite number from ``-MAX_WEIGHT`` to
  ``MAX_WEIGHT``: ``(text:1.2)`` sets a weight, and each pair of parentheses without one
  multiplies by 1.1 (``comfy/sd1_clip.py`` ``token_weights``; a weight of ``nan`` or ``inf``
  makes every frame black);
* parentheses nest at most ``MAX_NESTING`` deep (ComfyUI parses them recursively: a few
  thousand levels raise a RecursionError in the tokenizer).

``prompt_weights`` reads weights exactly as ComfyUI does (``\\(`` and ``\\)`` are literal
parentheses, an unbalanced ``)`` is kept as text, a weight is the text after the last ``:``
of a group when ``float()`` reads it), without recursion.
"""
from __future__ import annotations

import math
import unicodedata
from typing import Iterator

MAX_WEIGHT = 10.0   # (text:10) already drowns every other word; more is a typo or an attack
MAX_NESTING = 32    # ((((text)))) is 4; a few hundred would reach Python's recursion limit in ComfyUI
ALLOWED_CONTROLS = "\t\n\r"
_LITERAL = "\x00"   # stands for an escaped parenthesis while weights are read (control characters are refused)


def check_prompt(text, where: str, max_chars: int) -> str:
    """``text`` stripped, if a text encoder can take it; ValueError naming ``where`` and what to change."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} must be text of 1 to {max_chars} characters")
    text = text.strip()
    if len(text) > max_chars:
        raise ValueError(f"{where} has {len(text)} characters (at most {max_chars})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{where} holds a character no text encoder can take (a lone surrogate "
                         f"U+{ord(text[error.start]):04X} at position {error.start}): send it as valid UTF-8") from None
    for position, char in enumerate(text):
        if char not in ALLOWED_CONTROLS and unicodedata.category(char) == "Cc":
            raise ValueError(f"{where} holds the control character U+{ord(char):04X} at position {position}: "
                             f"remove it (tabs and line breaks are allowed)")
    for weight, group in prompt_weights(text, where):
        if not (math.isfinite(weight) and -MAX_WEIGHT <= weight <= MAX_WEIGHT):
            shown = group if len(group) <= 60 else group[:57] + "..."
            raise ValueError(f"{where}: the weight of {shown!r} is {weight!r}; a weight must be a number from "
                             f"{-MAX_WEIGHT:g} to {MAX_WEIGHT:g} (e.g. '(watercolor:1.2)')")
    return text


def prompt_weights(text: str, where: str = "the prompt") -> Iterator[tuple[float, str]]:
    """(weight, group text) of every parenthesised group, as ComfyUI's tokenizer weighs it.

    ValueError when groups nest deeper than ``MAX_NESTING``.
    """
    pending = [(text.replace("\\(", _LITERAL).replace("\\)", _LITERAL), 1.0, 0)]
    while pending:
        part, weight, depth = pending.pop()
        for piece in _top_level(part):
            if len(piece) < 2 or piece[0] != "(" or piece[-1] != ")":
                continue
            if depth >= MAX_NESTING:
                raise ValueError(f"{where}: parentheses nest more than {MAX_NESTING} deep: use '(text:1.5)' "
                                 f"to weigh text")
            inner, inner_weight = piece[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            yield inner_weight, piece.replace(_LITERAL, "\\")
            pending.append((inner, inner_weight, depth + 1))


def _top_level(text: str) -> list[str]:
    """``text`` cut into plain runs and parenthesised groups, as ComfyUI's ``parse_parentheses`` cuts it.

    A ``)`` with no ``(`` before it lowers the level below 0 and stays in the text (as there).
    """
    pieces: list[str] = []
    start, level = 0, 0
    for i, char in enumerate(text):
        if char == "(":
            if level == 0 and i > start:
                pieces.append(text[start:i])
                start = i
            level += 1
        elif char == ")":
            level -= 1
            if level == 0:
                pieces.append(text[start:i + 1])
                start = i + 1
    if start < len(text):
        pieces.append(text[start:])
    return pieces
