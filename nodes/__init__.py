"""ComfyUI glue: one module per node family."""
from .bank_nodes import NODES as BANK_NODES

NODE_LIST = [*BANK_NODES]
