"""Counts and ordinals in reports and messages: "1 frame", "2 frames", "every 2nd", never "1 frames" or "1th"."""
from __future__ import annotations


def plural(count: int, word: str, words: str | None = None) -> str:
    """``"1 frame"``, ``"3 frames"`` (``words``: an irregular plural)."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


def ordinal(number: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ``11th``, ``12th``, ``13th``, ``21st``, ``102nd``."""
    if 10 <= number % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def every_nth(number: int) -> str:
    """``"every frame"``, ``"every 2nd frame"``."""
    return "every frame" if number == 1 else f"every {ordinal(number)} frame"
