"""Dense causal attention expressed as a Selection: every block up to the diagonal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longattn.core.selection import Selection
from longattn.methods.base import Method, SelectionContext


@dataclass
class Dense(Method):
    """Full causal attention, the baseline every method is measured against (PyTorch SDPA by default).

    As a Selection it keeps every causal block, which through the block-sparse operator must reproduce
    ``scaled_dot_product_attention``; ``sink_tokens`` and ``window`` have no effect because everything is kept.
    With ``use_sdpa`` every head of the Selection is marked dense, and the operator runs SDPA.
    """

    use_sdpa: bool = True
    """Mark every head dense, so the operator computes with PyTorch SDPA (the fast dense kernel, the honest
    baseline for speed-ups); False routes through the block-sparse operator with every block selected, the
    check that the operator is exact."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.use_sdpa, bool):
            raise ValueError(f"use_sdpa must be a bool, got {self.use_sdpa!r}")

    name: ClassVar[str] = "dense"
    paper: ClassVar[str] = "Attention Is All You Need (Vaswani et al., 2017) https://arxiv.org/abs/1706.03762"

    def block_mask(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        b, hq, tq, _ = q.shape
        return self.causal_block_mask(tq, ctx, qbs).expand(b, hq, -1, -1)

    def select(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Selection:
        """Every causal block, built directly and once per step (dense is the baseline: its selection must cost
        next to nothing): ``q [B, Hq, Tq, D]`` -> ``[B, Hkv, Qblk, Nblk]``, one row per KV head."""
        b, tq = q.shape[0], q.shape[2]
        qbs = self.query_block_size_for(tq)
        key = ("dense", b, ctx.num_kv_heads, qbs, self.block_size, tq, ctx.kv_len, ctx.q_offset, self.use_sdpa)
        if ctx.step_cache is not None and key in ctx.step_cache:
            return ctx.step_cache[key]
        pattern = self.pattern(tq, ctx, qbs)
        blocks = torch.arange(pattern.num_kv_blocks, device=q.device, dtype=torch.int32)
        causal = blocks.view(1, -1) <= pattern.causal_hi.view(-1, 1)  # [Qblk, Nblk]
        shape = (b, ctx.num_kv_heads, *causal.shape)
        indices = torch.where(causal, blocks, -1).expand(shape).contiguous()
        counts = (pattern.causal_hi + 1).to(torch.int32).expand(shape[:3]).contiguous()
        selection = Selection(indices, counts, qbs, self.block_size,
                              dense_heads=(True,) * ctx.num_kv_heads if self.use_sdpa else None)
        if ctx.step_cache is not None:
            ctx.step_cache[key] = selection
        return selection
