"""Test-only ControlNet nodes: a tiny random-weight ControlNet, and a recording one that keeps the hint rows of
every ControlNet call (GET /streamv2v_test/controlnet_hints returns them, DELETE forgets them), so a server test
checks the hint each frame carried through the stream batch, row by row."""
import collections
import sys
import threading

import comfy.controlnet

RECORDED = collections.deque(maxlen=10_000)  # one entry per ControlNet call: a digest per hint row
_LOCK = threading.Lock()


def _tiny_models():
    return sys.modules["streamv2v_test_host_tiny_models"]  # loaded by the package's __init__


def _digest(row):
    """A hint row ``[3, H, W]`` -> [mean, x-weighted mean]: tells frames apart where edges moved."""
    import torch

    row = row.detach().float().cpu()
    x = torch.linspace(0, 1, row.shape[-1])
    return [round(float(row.mean()), 5), round(float((row * x).mean()), 5)]


class RecordingControlNet(comfy.controlnet.ControlNet):
    """A ControlNet that records, per call, the mean of each hint row it is given (after the engine set them)."""

    def copy(self):
        c = RecordingControlNet(None, global_average_pooling=self.global_average_pooling, load_device=self.load_device,
                                manual_cast_dtype=self.manual_cast_dtype)
        c.control_model, c.control_model_wrapped = self.control_model, self.control_model_wrapped
        self.copy_to(c)
        return c

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        hint = self.cond_hint_original
        if hint is not None:
            with _LOCK:
                RECORDED.append({"rows": int(x_noisy.shape[0]), "hints": [_digest(row) for row in hint]})
        return super().get_control(x_noisy, t, cond, batched_number, transformer_options)


class TinyControlNetLoader:
    """CONTROL_NET for the tiny SD1.5 checkpoint (like ControlNetLoader); ``record`` keeps every call's hints."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "record": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    CATEGORY = "testing/streamv2v"

    def load(self, seed, record):
        net = _tiny_models().tiny_controlnet(seed)
        if record:
            recording = RecordingControlNet(net.control_model, load_device=net.load_device)
            return (recording,)
        return (net,)


def _add_routes():
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    from aiohttp import web

    @instance.routes.get("/streamv2v_test/controlnet_hints")
    async def recorded(request):
        with _LOCK:
            return web.json_response({"calls": list(RECORDED)})

    @instance.routes.delete("/streamv2v_test/controlnet_hints")
    async def forget(request):
        with _LOCK:
            RECORDED.clear()
        return web.json_response({"cleared": True})


_add_routes()
NODE_CLASS_MAPPINGS = {"TinyControlNetLoader": TinyControlNetLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"TinyControlNetLoader": "Tiny ControlNet Loader (test)"}
