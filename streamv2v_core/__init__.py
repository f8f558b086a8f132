"""StreamV2V's algorithms in pure torch: the feature bank, EA, FF and DyMe.

Nothing here imports ComfyUI; ``patches`` speaks ComfyUI's transformer-patch protocol
through plain dicts so it can be tested without a host.
"""
from .attention import extend_with_bank, feature_fusion
from .bank import BANKS, BankConfig, BankHandle, BankRegistry, FeatureBank
from .merging import Matching, apply_matching, random_bipartite_matching
from .patches import BLOCK_CHOICES, ExtendedAttention, FeatureFusion

__all__ = [
    "BANKS", "BLOCK_CHOICES", "BankConfig", "BankHandle", "BankRegistry", "ExtendedAttention",
    "FeatureBank", "FeatureFusion", "Matching", "apply_matching", "extend_with_bank",
    "feature_fusion", "random_bipartite_matching",
]
