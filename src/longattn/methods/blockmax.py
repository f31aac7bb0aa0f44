"""BlockMax: a key block scores as its best key, seen by the query block's mean query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longattn.methods.base import SelectionContext, group_queries
from longattn.methods.topk import TopKMethod


@dataclass
class BlockMax(TopKMethod):
    """Sinks + window + the ``top_k`` key blocks whose *maximum* ``q̄ · k`` is largest, where ``q̄`` is the mean
    query of the query block (in decode, the query itself) and the maximum runs over every key of the block.

    A block's share of the softmax mass is decided by its few best keys, which a mean key averages away (MoBA)
    and a min/max bound overstates (Quest). Scoring every key with one mean query per query block costs what
    MoBA's scoring costs (``Tk x D`` per query block: one query against every key instead of 16 queries against
    every block mean), and on the default model it keeps what the block oracle keeps: at 4k tokens, 8 blocks
    of 16 plus sinks and window, 0.789 of the mass against the oracle's 0.792 and MoBA's 0.737; 0.60 against
    0.41 in the hidden-sink layers 3-8 (docs/results/quality.md). Decode scores the query against every key,
    a pass over K (half of dense decode's reads). No block index: it reads the raw keys.
    """

    block_size: int = 16
    window: int = 128
    top_k: int = 32
    """Blocks retrieved per query block (32 x 16 = 512 tokens) beyond the sinks and the window."""

    name: ClassVar[str] = "blockmax"
    paper: ClassVar[str] = (
        "Quest's observation that a block matters through its best key (https://arxiv.org/abs/2406.10774), "
        "scored exactly with a pooled query as in MoBA (https://arxiv.org/abs/2502.13189)"
    )
    summary: ClassVar[str | None] = None

    def block_scores(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        """``q [B, Hq, Tq, D]`` -> ``[B, Hq, Qblk, Nblk]``: the best ``q̄ · k`` of each key block, ``q̄`` the mean
        query of the query block."""
        k = self.raw_keys(ctx)
        b, hq, tq, d = q.shape
        hkv, tk, bs = k.shape[1], k.shape[2], self.block_size
        nkb, nqb = -(-tk // bs), -(-tq // qbs)
        rows = torch.nn.functional.pad(q.float(), (0, 0, 0, nqb * qbs - tq)).view(b, hq, nqb, qbs, d)
        counts = torch.full((nqb,), qbs, device=q.device, dtype=torch.float32)
        counts[-1] = tq - (nqb - 1) * qbs
        mean_q = rows.sum(3) / counts.view(1, 1, -1, 1)  # [B, Hq, Qblk, D]; pad rows are zeros
        scores = torch.einsum("bhgnd,bhtd->bhgnt", group_queries(mean_q, hkv), k.float())  # [B, Hkv, G, Qblk, Tk]
        scores = scores.reshape(b, hq, nqb, tk)
        if ctx.key_mask is not None:  # a padding key never makes its block's maximum
            scores = scores.masked_fill(~ctx.key_mask.view(b, 1, 1, tk), float("-inf"))
        scores = torch.nn.functional.pad(scores, (0, nkb * bs - tk), value=float("-inf"))
        return scores.view(b, hq, nqb, nkb, bs).amax(dim=-1)
