"""ComfyUI glue: one module per node family."""
from .bank_nodes import NODES as BANK_NODES
from .sampler_nodes import NODES as SAMPLER_NODES

NODE_LIST = [*BANK_NODES, *SAMPLER_NODES]
