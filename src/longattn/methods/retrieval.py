"""RetrievalAttention-style exact retrieval: the keys with the largest inner product with the query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longattn.methods.base import _SELECT_CHUNK_ELEMENTS, SelectionContext, group_queries
from longattn.methods.topk import TopKMethod


@dataclass
class Retrieval(TopKMethod):
    """Exact maximum-inner-product retrieval: each query attends the sinks, the local window and the ``top_k``
    keys (blocks of ``block_size`` keys, single tokens by default) whose ``q · k`` is largest, found by scoring
    every key. It costs a full ``q · K`` pass, so it is not a speed-up but the reference the block methods
    approximate: what attention recall a perfect retriever reaches at a given budget. RetrievalAttention finds
    the same keys with an approximate nearest-neighbour index. Paper: RetrievalAttention,
    https://arxiv.org/abs/2409.10516
    """

    block_size: int = 1
    """Keys per retrieval unit. 1 retrieves single tokens; larger blocks score a block by its best key (the
    upper bound that Quest's min/max estimates), the oracle for block methods of that size."""
    window: int = 128
    top_k: int = 512
    """Units retrieved per query block beyond the sinks and the window (512 tokens at block_size 1)."""

    query_block_size: int | None = 16
    """Queries sharing one selection in prefill (decode selects per token). 16 is what the block methods use,
    so the oracle is compared at their granularity; 1 is per-token retrieval, 16x the selection work."""

    name: ClassVar[str] = "retrieval"
    paper: ClassVar[str] = (
        "RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval https://arxiv.org/abs/2409.10516"
    )
    summary: ClassVar[str | None] = None

    def query_block_size_for(self, q_len: int) -> int:
        return 1 if q_len == 1 else (self.query_block_size or 1)

    def block_scores(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        """``q [B, Hq, Tq, D]`` -> ``[B, Hq, Qblk, Nblk]``: max over the block's keys and the query block's queries."""
        k = self.raw_keys(ctx)
        b, hq, tq, _ = q.shape
        hkv, tk, bs = k.shape[1], k.shape[2], self.block_size
        nkb, nqb = -(-tk // bs), -(-tq // qbs)
        keys = torch.nn.functional.pad(k.float(), (0, 0, 0, nkb * bs - tk))  # [B, Hkv, Nblk*bs, D]
        pad_key = torch.arange(nkb * bs, device=k.device) >= tk
        g = group_queries(q, hkv)  # [B, Hkv, G, Tq, D]
        out = []
        # Token-level scores are block_size times larger than the block scores the caller budgeted for.
        step = max(1, _SELECT_CHUNK_ELEMENTS // (b * hq * nkb * bs * qbs))
        for first in range(0, nqb, step):
            rows = g[:, :, :, first * qbs : (first + step) * qbs]
            s = torch.einsum("bhgtd,bhkd->bhgtk", rows, keys).masked_fill(pad_key, float("-inf"))
            s = s.reshape(b, hq, s.shape[3], nkb, bs).amax(dim=-1)  # [B, Hq, rows, Nblk]
            n = -(-s.shape[2] // qbs)
            s = torch.nn.functional.pad(s, (0, 0, 0, n * qbs - s.shape[2]), value=float("-inf"))
            out.append(s.view(b, hq, n, qbs, nkb).amax(dim=3))
        return torch.cat(out, dim=2)
