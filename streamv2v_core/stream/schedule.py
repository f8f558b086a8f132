"""SDEdit strength -> the S denoising timesteps of a stream (StreamDiffusion / StreamV2V's rule).

StreamDiffusion picks its steps from the 50-step LCM grid ``999, 979, ..., 19`` by index
(``t_index_list``); StreamV2V's default, 4 steps at strength 0.4, is ``t_index`` 30/35/40/45,
i.e. timesteps 399/299/199/99: the first step starts at ``1000 * strength - 1`` and the
steps are evenly spaced down to the clean image. Here that rule is continuous in the
strength (no snapping to the grid, no ``int(steps / strength)``):

    t_k = 1000 * strength * (S - k) / S - 1,      k = 0 .. S-1

At strength 0.4 and S = 4 this is exactly the authors' 399/299/199/99; at strength 1 the
first step starts from pure noise (timestep 999). Discrete models (SD1.5/SDXL, LCM) turn a
fractional timestep into a sigma by interpolating their log-sigma table, so every strength
in (0, 1] gets its own schedule.
"""
from __future__ import annotations

NUM_TRAIN_TIMESTEPS = 1000


def strength_timesteps(steps: int, strength: float) -> list[float]:
    """The ``steps`` timesteps (decreasing, in [0, 999]) of an SDEdit run at ``strength`` in (0, 1]."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    top = NUM_TRAIN_TIMESTEPS * float(strength)
    return [max(0.0, top * (steps - k) / steps - 1.0) for k in range(steps)]
