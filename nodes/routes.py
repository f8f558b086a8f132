"""HTTP routes under /streamv2v/, added to the running ComfyUI server once.

The loop's routes (webcam link, stop, status, live steering): nodes/loop/routes.py.
Bank routes (and releasing banks with ComfyUI's "Free memory"): nodes/bank_routes.py.

Routes are added only when a ComfyUI server exists (``server.PromptServer.instance``), so
importing the pack in-process (tests, scripts) registers nothing.
"""
from __future__ import annotations

from .bank_routes import add_bank_routes
from .loop import add_loop_routes
from .node_status import running_server

_registered = False


def register_routes() -> bool:
    """Add the routes to the running ComfyUI server, once; False when there is no server."""
    global _registered
    instance = running_server()
    if instance is None or _registered:
        return _registered
    app = getattr(instance, "app", None)
    add_loop_routes(instance.routes, app)
    add_bank_routes(instance.routes, app)
    _registered = True
    return True
