"""Quest: query-aware block selection by an upper bound of each block's attention score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longattn.methods.base import group_queries
from longattn.methods.topk import TopKMethod


@dataclass
class Quest(TopKMethod):
    """Quest keeps, per key block, the element-wise minimum and maximum of its keys; for a query ``q`` the sum
    over channels of ``max(q_d · min_d, q_d · max_d)`` bounds every ``q · k`` in the block from above, and the
    ``top_k`` blocks with the highest bound are attended (plus sinks and the local window). The bound never
    misses a block holding one strongly matching key, which a mean can average away; it is built for decode,
    where each token selects alone. Paper: Quest, https://arxiv.org/abs/2406.10774
    """

    block_size: int = 16
    """Keys per block (Quest's "page"). Small blocks keep the bound tight."""
    window: int = 128
    top_k: int = 32
    """Blocks retrieved per query block (32 x 16 = 512 tokens) beyond the sinks and the window."""

    name: ClassVar[str] = "quest"
    paper: ClassVar[str] = (
        "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference https://arxiv.org/abs/2406.10774"
    )
    summary: ClassVar[str | None] = "minmax"
    fused_score: ClassVar[str | None] = "minmax"

    def score(self, q: Tensor, summaries: Tensor) -> Tensor:
        """``q [B, Hq, Tq, D]``, summaries ``[B, Hkv, Nblk, 2, D]`` (min, max) -> ``[B, Hq, Tq, Nblk]``."""
        b, hq, tq, _ = q.shape
        g = group_queries(q, summaries.shape[1])  # [B, Hkv, G, Tq, D]
        lo, hi = summaries[:, :, :, 0], summaries[:, :, :, 1]  # [B, Hkv, Nblk, D]
        # max(q*lo, q*hi) = q*hi where q >= 0 else q*lo: two matmuls on the split query instead of a
        # [Tq, Nblk, D] elementwise tensor.
        pos, neg = g.clamp(min=0), g.clamp(max=0)
        s = torch.einsum("bhgtd,bhnd->bhgtn", pos, hi) + torch.einsum("bhgtd,bhnd->bhgtn", neg, lo)
        return s.reshape(b, hq, tq, -1)
