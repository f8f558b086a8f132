"""StreamV2V's algorithms in pure torch: the feature bank, EA, FF, DyMe and the stream batch.

Nothing here imports ComfyUI; ``patches`` speaks ComfyUI's transformer-patch protocol
through plain dicts, and ``calls`` holds what one model call reads and writes, so both
can be tested without a host.
"""
from .bank.attention import extend_with_bank, feature_fusion
from .bank.storage import BANKS, BankConfig, BankHandle, BankRegistry, FeatureBank
from .bank.calls import CALLS_KEY, PLAN_KEY, BankCall, RowPlan
from .bank.merging import Matching, apply_matching, random_bipartite_matching
from .bank.patches import BLOCK_CHOICES, ExtendedAttention, FeatureFusion

__all__ = [
    "BANKS", "BLOCK_CHOICES", "BankCall", "BankConfig", "BankHandle", "BankRegistry", "CALLS_KEY",
    "ExtendedAttention", "FeatureBank", "FeatureFusion", "Matching", "PLAN_KEY", "RowPlan", "apply_matching",
    "extend_with_bank", "feature_fusion", "random_bipartite_matching",
]
