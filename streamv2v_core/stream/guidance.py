"""Residual classifier-free guidance (StreamDiffusion, Kodaira et al. 2023, section 3.3).

Full CFG evaluates every row twice: ``eps = eps_neg + g (eps_pos - eps_neg)``. Residual CFG
replaces ``eps_neg`` by a *virtual residual noise* computed without the UNet. In ComfyUI's
k-diffusion form (``x_sigma = x0 + sigma * eps`` for eps models, the model returning its clean
estimate ``D = x - sigma * eps``):

* self-negative: the negative is the input frame itself, ``x0_ref`` = the frame's encoded
  latent; ``eps_neg' = delta * (x - x0_ref) / sigma``. No extra row.
* one-time negative: one real negative pass at a frame's first step gives ``eps_neg(sigma_0)``
  and from it ``x0_ref = x_sigma0 - sigma_0 * eps_neg = D_neg(sigma_0)``; later steps use the
  same formula. One extra row per frame.

Then ``eps = eps_neg' + g (eps_pos - eps_neg')``, which in the model's ``D`` form is
``V + g (D_pos - V)`` with ``V = x - delta (x - x0_ref)`` (no division by sigma).
"""
from __future__ import annotations

import torch

FULL = "full CFG"
SELF_NEGATIVE = "residual self-negative"
ONE_TIME_NEGATIVE = "residual one-time negative"
GUIDANCE_CHOICES = (FULL, SELF_NEGATIVE, ONE_TIME_NEGATIVE)


def residual_guidance(x: torch.Tensor, denoised: torch.Tensor, x0_ref: torch.Tensor, cfg: float,
                      delta: float = 1.0) -> torch.Tensor:
    """Guided clean estimate ``[R, C, h, w]`` from the positive one and each row's negative reference.

    x: the noisy rows; denoised: the model's positive estimate ``D_pos``; x0_ref: the rows'
    virtual negative clean latents (all ``[R, C, h, w]``, or ``[1, ...]`` broadcast).
    """
    virtual = x - delta * (x - x0_ref)
    return virtual + cfg * (denoised - virtual)
