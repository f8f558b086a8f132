"""A test node that makes a running model go wrong on demand: the next N UNet calls get NaN input.

What a broken model, an fp16 overflow or a NaN weight does to a show, made reproducible:
``POST /streamv2v_test/fault`` ``{"nan_calls": N}`` arms it; ``GET`` says how many calls it spoiled.
"""
import json
import threading

_STATE = {"armed": 0, "spoiled": 0}
_LOCK = threading.Lock()


def _spoil(apply_model, args: dict):
    with _LOCK:
        spoil = _STATE["armed"] > 0
        if spoil:
            _STATE["armed"] -= 1
            _STATE["spoiled"] += 1
    x = args["input"]
    return apply_model(x * float("nan") if spoil else x, args["timestep"], **args["c"])


class TinyFaultSwitch:
    """MODEL -> the same model whose UNet input turns NaN for the calls ``POST /streamv2v_test/fault`` arms."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"
    CATEGORY = "testing/streamv2v"

    def wrap(self, model):
        model = model.clone()
        model.set_model_unet_function_wrapper(_spoil)
        return (model,)


def _add_routes():
    import server
    from aiohttp import web

    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return

    @instance.routes.post("/streamv2v_test/fault")
    async def arm(request):
        body = json.loads(await request.read() or b"{}")
        with _LOCK:
            _STATE["armed"] = int(body.get("nan_calls", 0))
        return web.json_response(dict(_STATE))

    @instance.routes.get("/streamv2v_test/fault")
    async def state(request):
        with _LOCK:
            return web.json_response(dict(_STATE))


_add_routes()

NODE_CLASS_MAPPINGS = {"TinyFaultSwitch": TinyFaultSwitch}
NODE_DISPLAY_NAME_MAPPINGS = {"TinyFaultSwitch": "Tiny Fault Switch (test)"}
