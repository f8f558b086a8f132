"""The UNet forward, with the bank patches inside, through ``torch.compile`` (an APPLY_MODEL wrapper)."""
from __future__ import annotations

import logging

import torch

import comfy.model_management

log = logging.getLogger("streamv2v")

COMPILE_KEY = "streamv2v.compile"
COMPILE_BACKEND = "inductor"  # tests use "eager" (tracing only)


class CompiledUNet:
    """APPLY_MODEL wrapper: the UNet forward, with the bank patches inside, through ``torch.compile``.

    Made for one stream (it lives on the engine's own model clone). The patches read only
    per-call layout integers, so the compiled graph is reused call after call (a few
    variants while the bank fills and for the frames that update it). If compiling or
    running the compiled graph fails, it says so once and the stream goes on eagerly.
    """

    def __init__(self, backend: str | None = None):
        self.backend = backend or COMPILE_BACKEND
        self.compiled = None
        self.failed: str | None = None

    def __call__(self, executor, *args, **kwargs):
        base = executor.class_obj
        if self.failed is not None:
            return executor(*args, **kwargs)
        original = base.diffusion_model
        try:
            if self.compiled is None:
                self.compiled = torch.compile(original, backend=self.backend, dynamic=False)
            base.diffusion_model = self.compiled
            return executor(*args, **kwargs)
        except comfy.model_management.InterruptProcessingException:
            raise
        except Exception as error:  # no compiler, an op the backend cannot take, ...: run as usual
            self.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            log.warning("StreamV2V: the compiled UNet path is not available here (%s); running it uncompiled",
                        self.failed)
            base.diffusion_model = original
            return executor(*args, **kwargs)
        finally:
            base.diffusion_model = original
