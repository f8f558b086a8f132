"""StreamDiffusion's stochastic similarity filter: skip frames that barely changed."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..seeds import seed_of


def skip_probability(frame: torch.Tensor, reference: torch.Tensor, threshold: float) -> float:
    """``max(0, 1 - (1 - s) / (1 - threshold))`` with ``s`` the cosine similarity of the two images in [-1, 1].

    frame, reference: images in 0..1 (any shape); StreamDiffusion compares the [-1, 1]
    tensors it feeds the VAE, so both are mapped there first (on [0, 1] pixels every
    image is similar to every other: all values are positive).
    """
    a = frame.detach().reshape(-1).double() * 2 - 1
    b = reference.detach().reshape(-1).double() * 2 - 1
    similarity = float(F.cosine_similarity(a, b, dim=0))
    return max(0.0, 1.0 - (1.0 - similarity) / (1.0 - threshold))


class SimilarityFilter:
    """Decides, frame by frame, whether a frame can reuse the last processed frame's output.

    A frame is skipped with ``skip_probability`` against the *reference*, the last frame
    that was processed (it stays fixed while frames are skipped). As StreamDiffusion's
    filter (``skip_count > max_skip_frame`` forces a frame through), a frame is processed
    regardless once more than ``max_skips`` frames in a row were skipped: at most
    ``max_skips + 1`` skips in a row. The coin for input frame i is
    drawn from a generator seeded with (seed, i), so runs repeat and a stream continued
    over several runs flips the same coins as one run.
    """

    def __init__(self, threshold: float = 0.98, max_skips: int = 10, seed: int = 0):
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"similarity threshold must be in [0, 1), got {threshold}")
        self.threshold = threshold
        self.max_skips = max_skips
        self.seed = seed
        self._reference: torch.Tensor | None = None
        self._skipped = 0
        self._seen = 0
        self.skips = 0  # frames skipped since the filter was made (for reports)

    def skip(self, frame: torch.Tensor) -> bool:
        """frame: an image in 0..1 (e.g. ``[H, W, 3]``). True when it should reuse the previous output."""
        index, self._seen = self._seen, self._seen + 1
        if self._reference is not None and self._skipped <= self.max_skips and frame.shape == self._reference.shape:
            coin = random.Random(seed_of(self.seed, index)).random()
            if coin < skip_probability(frame, self._reference, self.threshold):
                self._skipped += 1
                self.skips += 1
                return True
        self._reference = frame.detach().clone()
        self._skipped = 0
        return False
