"""StreamDiffusion's stochastic similarity filter: skip frames that barely changed."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class SimilarityFilter:
    """Decides, frame by frame, whether a frame can reuse the last processed frame's output.

    The cosine similarity ``s`` between the frame and the last processed frame is
    turned into a skip probability ``max(0, (s - threshold) / (1 - threshold))``: a
    still image is skipped almost always, a changing one never. After ``max_skips``
    skips in a row the next frame is processed regardless. The coin flips come from a
    private generator seeded with ``seed``, so runs repeat.
    """

    def __init__(self, threshold: float = 0.98, max_skips: int = 10, seed: int = 0):
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"similarity threshold must be in [0, 1), got {threshold}")
        self.threshold = threshold
        self.max_skips = max_skips
        self._generator = torch.Generator().manual_seed(seed)
        self._reference: torch.Tensor | None = None
        self._skipped = 0

    def skip(self, frame: torch.Tensor) -> bool:
        """frame: any shape (e.g. ``[H, W, 3]``). True when it should reuse the previous output."""
        flat = frame.detach().reshape(-1).float()
        if self._reference is not None and self._skipped < self.max_skips and flat.shape == self._reference.shape:
            similarity = float(F.cosine_similarity(flat, self._reference, dim=0))
            probability = max(0.0, (similarity - self.threshold) / (1.0 - self.threshold))
            if float(torch.rand((), generator=self._generator)) < probability:
                self._skipped += 1
                return True
        self._reference = flat.clone()
        self._skipped = 0
        return False
