"""Core types, shared by every layer above: Selection, the sinks + window pattern, the block index, position
policies and HeadProfile. Nothing here imports another longattn layer."""

from longattn.core.index import SUMMARIES, BlockIndex, mean_summary, minmax_summary
from longattn.core.pattern import StepPattern, window_first_block
from longattn.core.profile import HeadProfile
from longattn.core.selection import Selection, causal_pairs

__all__ = [
    "SUMMARIES", "BlockIndex", "HeadProfile", "Selection", "StepPattern", "causal_pairs", "mean_summary",
    "minmax_summary", "window_first_block",
]
