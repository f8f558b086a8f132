"""Video temporal-consistency metrics for StreamV2V (pure Python: numpy, OpenCV, PySceneDetect, PIL).

Videos are ComfyUI IMAGE batches: ``[T, H, W, 3]`` floats in ``0..1``, numpy or torch.

* :func:`warp_error` — StreamV2V Sec. 5.3.1 warp error (Lai et al. 2018), 0..255 MSE scale.
* :func:`flow_score` — StreamingT2V OFS, mean squared optical-flow magnitude (px^2).
* :func:`mawe` — StreamingT2V motion aware warp error, ``W / OFS``.
* :func:`scene_cuts` — StreamingT2V SCuts, PySceneDetect ``AdaptiveDetector`` cut count.
* :func:`clip_frame_consistency` — StreamV2V "CLIP score": mean consecutive cosine x100.
* :func:`plot_per_frame` — PIL line plot as a ``[H, W, 3]`` float image.

Optical flow is OpenCV DIS (medium preset); the papers used RAFT.
"""

from .clip_consistency import clip_frame_consistency, consecutive_cosine_similarities
from .plot import plot_per_frame
from .scenes import scene_cuts
from .warp import (
    MaweResult,
    WarpErrorResult,
    backward_warp,
    compute_flows,
    flow_score,
    mawe,
    occlusion_mask,
    warp_error,
)

__all__ = [
    "WarpErrorResult",
    "MaweResult",
    "warp_error",
    "flow_score",
    "mawe",
    "compute_flows",
    "occlusion_mask",
    "backward_warp",
    "scene_cuts",
    "clip_frame_consistency",
    "consecutive_cosine_similarities",
    "plot_per_frame",
]
