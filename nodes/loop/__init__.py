"""The loop family: StreamV2V Loop (a video or live source through the stream engine into an MP4), Next Frame
(Auto Queue, one frame per run), Webcam Echo (the browser link without a model), and the loop's HTTP routes.

node.py (the Loop node) reads frames from sources.py (file, folder, camera, browser webcam), lets
steering.py give each frame its own prompt, hint and live changes as it enters the engine
(nodes/engine), and writes every output to sink.py (MP4, preview, the browser, the stage's viewers). routes.py
holds the loop's HTTP routes, stage.py the stage page and its MJPEG stream; cursors.py the Next Frame node's
positions.
"""
from .echo import NODES as ECHO_NODES
from .next_frame import NODES as NEXT_FRAME_NODES
from .node import NODES as LOOP_NODES
from .routes import add_loop_routes

NODES = [*LOOP_NODES, *NEXT_FRAME_NODES, *ECHO_NODES]

__all__ = ["NODES", "add_loop_routes"]
