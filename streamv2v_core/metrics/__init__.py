"""Video temporal-consistency metrics for StreamV2V (pure Python: numpy, OpenCV, PySceneDetect, PIL).

Videos are ComfyUI IMAGE batches: ``[T, H, W, 3]`` floats in ``0..1``, numpy or torch.

* :func:`warp_error` — StreamV2V Sec. 5.3.1 warp error (Lai et al. 2018), 0..255 MSE scale.
* :func:`flow_score` — StreamingT2V OFS, mean squared optical-flow magnitude (px^2).
* :func:`mawe` — StreamingT2V motion aware warp error, ``W / OFS``.
* :func:`flow_magnitude_std` — StreamingT2V appendix 9.3: std of the flow magnitude across frames.
* :func:`scene_cuts` — StreamingT2V SCuts, PySceneDetect ``AdaptiveDetector`` cut count.
* :func:`seam_stats` — MAWE, scene cuts and flow std restricted to chunk boundaries.
* :func:`clip_frame_consistency` — StreamV2V "CLIP score": mean consecutive cosine x100.
* :func:`plot_per_frame` — PIL line plot as a ``[H, W, 3]`` float image.

Optical flow is OpenCV DIS (medium preset); the papers used RAFT.
"""

from .clip_consistency import clip_frame_consistency, consecutive_cosine_similarities
from .plot import plot_per_frame
from .scenes import scene_cut_frames, scene_cuts
from .seams import SeamStats, chunk_boundary_pairs, seam_stats
from .warp import (
    MaweResult,
    WarpErrorResult,
    backward_warp,
    compute_flows,
    flow_magnitude_std,
    flow_magnitudes,
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
    "flow_magnitude_std",
    "flow_magnitudes",
    "compute_flows",
    "occlusion_mask",
    "backward_warp",
    "scene_cuts",
    "scene_cut_frames",
    "SeamStats",
    "chunk_boundary_pairs",
    "seam_stats",
    "clip_frame_consistency",
    "consecutive_cosine_similarities",
    "plot_per_frame",
]
