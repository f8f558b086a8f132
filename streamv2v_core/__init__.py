"""StreamV2V's algorithms in pure torch: the feature bank, EA, FF, DyMe and the stream batch.

Nothing here imports ComfyUI; ``patches`` speaks ComfyUI's transformer-patch protocol
through plain dicts, and ``calls`` holds what one model call reads and writes, so both
can be tested without a host.
"""
from .bank.attention import extend_with_bank, feature_fusion
from .bank.calls import BankCall, RowPlan
from .bank.feature_bank import BankConfig, FeatureBank
from .bank.merging import Matching, apply_matching, random_bipartite_matching
from .bank.patches import BLOCK_CHOICES, ExtendedAttention, FeatureFusion
from .bank.registry import BANKS, BankHandle, BankRegistry
from .bank.state import STATE_KEY, ModelState

__all__ = [
    "BANKS", "BLOCK_CHOICES", "BankCall", "BankConfig", "BankHandle", "BankRegistry", "ExtendedAttention",
    "FeatureBank", "FeatureFusion", "Matching", "ModelState", "RowPlan", "STATE_KEY", "apply_matching",
    "extend_with_bank", "feature_fusion", "random_bipartite_matching",
]
