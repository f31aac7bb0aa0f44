"""LongHeads: every head retrieves its own in-window set of chunks, so the heads together cover the context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longattn.methods.base import group_queries
from longattn.methods.topk import TopKMethod


@dataclass
class LongHeads(TopKMethod):
    """LongHeads keeps the first chunk and the local chunks and lets every head pick, by itself, the ``top_k``
    chunks whose representation its query scores highest, so each head attends only an in-window number of
    tokens while the heads of a layer together read the whole context. A chunk is represented by its keys
    pooled with the chunk's own attention rather than by a plain mean. (The paper also re-maps positions so the
    selected chunks sit inside the trained window; that is a position policy for context extension, separate
    from this selection rule.) Paper: LongHeads, https://arxiv.org/abs/2402.10685
    """

    block_size: int = 16
    """Tokens per chunk. The paper uses 256-token chunks on 7B models; 16 selects far better on small models."""
    sink_tokens: int = 16
    """The first chunk, always kept."""
    window: int = 128
    top_k: int = 32
    """Chunks retrieved per head and query block (32 x 16 = 512 tokens) beyond the first and local chunks."""

    name: ClassVar[str] = "longheads"
    paper: ClassVar[str] = (
        "LongHeads: Multi-Head Attention is Secretly a Long Context Processor https://arxiv.org/abs/2402.10685"
    )
    summary: ClassVar[str | None] = "attention_pooled"
    rotatable_scores: ClassVar[bool] = True

    def score(self, q: Tensor, summaries: Tensor) -> Tensor:
        """``q [B, Hq, Tq, D]``, summaries ``[B, Hkv, Nblk, 1, D]`` -> ``[B, Hq, Tq, Nblk]``."""
        b, hq, tq, _ = q.shape
        g = group_queries(q, summaries.shape[1])
        return torch.einsum("bhgtd,bhnd->bhgtn", g, summaries[:, :, :, 0]).reshape(b, hq, tq, -1)
