"""longattn: training-free block-sparse attention for Hugging Face decoder LLMs.

Every head keeps the attention sinks and a local window and retrieves only the key blocks its query needs.
"""

from longattn.bench.profiling import profile_heads
from longattn.core import BlockIndex, Selection
from longattn.core.profile import HeadProfile
from longattn.hf import (
    AttentionStats, GrowingCache, HeadAwareCache, Session, ShardedCache, apply, load_model, parallel_prefill,
)
from longattn.methods import Method, SelectionContext, get_method, list_methods
from longattn.ops import block_sparse_attention, merge_attention

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "BlockIndex",
    "GrowingCache",
    "HeadAwareCache",
    "HeadProfile",
    "Method",
    "Selection",
    "SelectionContext",
    "Session",
    "ShardedCache",
    "__version__",
    "apply",
    "block_sparse_attention",
    "get_method",
    "list_methods",
    "load_model",
    "merge_attention",
    "parallel_prefill",
    "profile_heads",
]
