"""StreamV2V for ComfyUI: streaming video-to-video with a feature bank (Liang et al., "Looking Backward")."""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODE_LIST

WEB_DIRECTORY = "./web"


class StreamV2VExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)


async def comfy_entrypoint() -> StreamV2VExtension:
    return StreamV2VExtension()
