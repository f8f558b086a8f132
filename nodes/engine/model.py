"""The engine's own clone of the user's model: guidance functions per row, the VAE loaded with the UNet,
optionally the UNet compiled; the run's sigmas from the strength rule."""
from __future__ import annotations

from typing import Callable

import torch

import comfy.patcher_extension

from ...streamv2v_core.bank.state import with_state
from ...streamv2v_core.stream.schedule import strength_timesteps
from .compiled_unet import OFF, install_compile
from .controlnets import RowControl
from .device_vae import attach

ROW_CONTROL_KEY = "streamv2v.row_control"

# --------------------------------------------------------------------------- model preparation

def _row_args(args: dict, row: int, batch: int) -> dict:
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch:
            v = v[row:row + 1]
        elif k == "conds_out":
            v = [t[row:row + 1] if isinstance(t, torch.Tensor) and t.shape[0] == batch else t for t in v]
        out[k] = v
    return out


def per_row(fn: Callable, returns_list: bool = False) -> Callable:
    """Call a guidance function row by row, as it is called when frames are sampled one at a time.

    Guidance functions (``sampler_cfg_function`` & co., e.g. core VideoLinearCFGGuidance)
    may treat the batch as one group; in a stream batch the rows are different frames at
    different steps, so each row gets its own call.
    """
    def row_by_row(args):
        batch = args["input"].shape[0]
        if batch == 1:
            return fn(args)
        results = [fn(_row_args(args, r, batch)) for r in range(batch)]
        if returns_list:
            return [torch.cat(parts) if isinstance(parts[0], torch.Tensor) else parts[0] for parts in zip(*results)]
        return torch.cat(results)
    row_by_row.streamv2v_per_row = fn
    return row_by_row


def stream_model(model, vae, compile_unet=OFF):
    """A clone of ``model`` for the stream engine: guidance functions per row, VAE loaded with the UNet,
    ControlNet strength per row (``controlnets.RowControl``), optionally the UNet compiled (``compile_unet``:
    a mode of ``compiled_unet``, or a saved boolean)."""
    model = model.clone()
    options = model.model_options
    options["transformer_options"] = with_state(options.get("transformer_options"), engine=True)
    if "sampler_cfg_function" in options:
        options["sampler_cfg_function"] = per_row(options["sampler_cfg_function"])
    for key, returns_list in (("sampler_post_cfg_function", False), ("sampler_pre_cfg_function", True)):
        if options.get(key):
            options[key] = [per_row(fn, returns_list) for fn in options[key]]
    attach(model, vae)
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    model.remove_wrappers_with_key(apply_model, ROW_CONTROL_KEY)
    model.add_wrapper_with_key(apply_model, ROW_CONTROL_KEY, RowControl())  # outside the compiled UNet
    install_compile(model, compile_unet)
    return model


def strength_sigmas(model_sampling, steps: int, strength: float) -> list[float]:
    """The run's ``steps + 1`` sigmas (host floats, last 0) from the strength rule (``schedule.py``)."""
    timesteps = torch.tensor(strength_timesteps(steps, strength), dtype=torch.float32)
    return [float(s) for s in model_sampling.sigma(timesteps).flatten().tolist()] + [0.0]
