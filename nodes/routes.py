"""HTTP routes under /streamv2v/, added to the running ComfyUI server once.

Webcam and loop routes: nodes/webcam_routes.py; live steering of a loop: nodes/loop_params_routes.py.
Bank routes (and releasing banks with ComfyUI's "Free memory"): nodes/bank_routes.py.

Routes are added only when a ComfyUI server exists (``server.PromptServer.instance``), so
importing the pack in-process (tests, scripts) registers nothing.
"""
from __future__ import annotations

from .bank_routes import add_bank_routes
from .loop_params_routes import add_loop_params_routes
from .node_status import running_server
from .webcam_routes import add_webcam_routes

_registered = False


def register_routes() -> bool:
    """Add the routes to the running ComfyUI server, once; False when there is no server."""
    global _registered
    instance = running_server()
    if instance is None or _registered:
        return _registered
    add_webcam_routes(instance.routes)
    add_loop_params_routes(instance.routes)
    add_bank_routes(instance.routes, getattr(instance, "app", None))
    _registered = True
    return True
