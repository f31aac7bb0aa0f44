"""Core types: key-block index and Selection."""

from longattn.core.index import SUMMARIES, BlockIndex, mean_summary, minmax_summary
from longattn.core.selection import Selection, causal_pairs

__all__ = ["SUMMARIES", "BlockIndex", "Selection", "causal_pairs", "mean_summary", "minmax_summary"]
