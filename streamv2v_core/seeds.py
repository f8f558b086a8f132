"""Private random streams: every random draw of the pack depends only on what it is for, never on call order.

A seed is derived from a tuple of plain values (the user's seed, a frame, a step, a key):
the stream batch, sequential sampling and runs continued across prompts then draw the same
numbers, and the global RNGs (torch, numpy, random) are never touched.
"""
from __future__ import annotations

import zlib

import torch


def seed_of(*parts) -> int:
    """A 32-bit seed from ``parts`` (plain values with a stable ``repr``)."""
    return zlib.crc32(repr(parts).encode())


def generator(device, *parts) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from ``parts``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed_of(*parts))
    return g
