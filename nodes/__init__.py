"""ComfyUI glue: one module per node family."""
from .bank_nodes import NODES as BANK_NODES
from .blend_nodes import NODES as BLEND_NODES
from .loop_nodes import NODES as LOOP_NODES
from .metrics_nodes import NODES as METRICS_NODES
from .sampler_nodes import NODES as SAMPLER_NODES
from .bank_routes import register_bank_routes
from .routes import register_routes

register_routes()
register_bank_routes()

NODE_LIST = [*BANK_NODES, *SAMPLER_NODES, *LOOP_NODES, *METRICS_NODES, *BLEND_NODES]
