"""MoBA: each query block retrieves the key blocks whose mean key it scores highest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longattn.methods.base import TopKMethod, group_queries


@dataclass
class MoBA(TopKMethod):
    """Mixture of Block Attention, training-free: a key block is represented by its mean key; each query
    head keeps the sinks, the local window and the ``top_k`` blocks with the highest ``q · mean(k)``
    (the same chunk scoring LongHeads uses). Paper: MoBA, https://arxiv.org/abs/2502.13189
    """

    name: ClassVar[str] = "moba"
    paper: ClassVar[str] = "MoBA: Mixture of Block Attention for Long-Context LLMs https://arxiv.org/abs/2502.13189"
    summary: ClassVar[str | None] = "mean"

    def score(self, q: Tensor, summaries: Tensor) -> Tensor:
        """``q [B, Hq, Tq, D]``, summaries ``[B, Hkv, Nblk, 1, D]`` -> ``[B, Hq, Tq, Nblk]``."""
        b, hq, tq, _ = q.shape
        g = group_queries(q, summaries.shape[1])  # [B, Hkv, G, Tq, D]
        s = torch.einsum("bhgtd,bhnd->bhgtn", g, summaries[:, :, :, 0])
        return s.reshape(b, hq, tq, -1)
