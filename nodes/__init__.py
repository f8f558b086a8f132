"""ComfyUI glue: one module per node family."""
from .bank_nodes import NODES as BANK_NODES
from .blend_nodes import NODES as BLEND_NODES
from .loop import NODES as LOOP_NODES
from .metrics_nodes import NODES as METRICS_NODES
from .routes import register_routes
from .sampler_nodes import NODES as SAMPLER_NODES
from .toy_model import NODES as TOY_MODEL_NODES

register_routes()

NODE_LIST = [*BANK_NODES, *SAMPLER_NODES, *LOOP_NODES, *METRICS_NODES, *BLEND_NODES, *TOY_MODEL_NODES]
