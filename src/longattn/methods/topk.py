"""Scored methods: sinks + window + the ``top_k`` key blocks each query block scores highest.

A subclass defines only its idea, :meth:`TopKMethod.score` (or :meth:`TopKMethod.block_scores` when its score
is not per query token); pooling over a query block, eligibility and the top-k are shared here. Where the
score is one the fused Triton kernel computes, the class says so with ``fused_score`` and, on backend
"triton", selection runs fused (:func:`longattn.ops.block_topk.block_topk`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longattn.core.checks import check_int
from longattn.core.selection import Selection
from longattn.methods.base import Method, SelectionContext


@dataclass
class TopKMethod(Method):
    """Sinks + window + the ``top_k`` highest-scoring other blocks. Subclasses define ``score``."""

    top_k: int = 8
    """Key blocks retrieved per query block beyond the sinks and the window."""
    share_kv_heads: bool = False
    """One selection per KV head (max score over its query heads): cheaper, coarser."""

    fused_score: ClassVar[str | None] = None
    """The :mod:`longattn.ops.block_topk` kind ("mean", "minmax") that :meth:`score` computes, letting the
    fused Triton block top-k select for this method on backend "triton"; None: always the PyTorch path. A
    capability of the class that declares it: a subclass that changes how scores become a selection sets it
    back to None."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("top_k", self.top_k, 0)
        if not isinstance(self.share_kv_heads, bool):
            raise ValueError(f"share_kv_heads must be a bool, got {self.share_kv_heads!r}")

    def query_block_size_for(self, q_len: int) -> int:
        if q_len == 1:
            return 1
        return self.query_block_size or min(self.block_size, 16)

    def select(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Selection:
        if self.uses_fused_topk(ctx):
            return self.fused_select(q, self.checked_summaries(summaries, q.shape[0], ctx), ctx)
        return super().select(q, summaries, ctx)

    def uses_fused_topk(self, ctx: SelectionContext) -> bool:
        """Whether this step selects through :func:`longattn.ops.block_topk.block_topk` (scoring, pooling and
        top-k in one pass, from the block ids; no ``[Qblk, Nblk]`` mask to build and sort): a ``fused_score``,
        per-head selection at real positions, and on backend "triton" a Triton with ``tl.topk``. On backend
        "native" its C kernel runs (4x its naive path at 32k tokens), elsewhere the naive PyTorch path
        (measured 1.5x faster than the mask path at 8k with the same Selection)."""
        if self.fused_score is None or self.share_kv_heads or ctx.reposition is not None:
            return False
        if ctx.backend != "triton":
            return True
        from longattn.ops.block_topk import fused_topk_available

        return fused_topk_available()  # an older Triton without tl.topk keeps the PyTorch selection

    def fused_select(self, q: Tensor, summaries: Tensor, ctx: SelectionContext, backend: str = "auto") -> Selection:
        """The Selection of :meth:`select` (static sinks + window, then the ``top_k`` best retrievable blocks)
        with scoring, pooling and top-k fused (:func:`longattn.ops.block_topk.block_topk`): no per-query
        ``[Tq, Nblk]`` score tensor. ``q [B, Hq, Tq, D]``, summaries ``[B, Hkv, Nblk, R, D]``.
        """
        from longattn.ops.block_topk import block_topk

        b, hq, tq, _ = q.shape
        qbs = self.query_block_size_for(tq)
        pattern = self.pattern(tq, ctx, qbs)
        nkb, nqb, dev = pattern.num_kv_blocks, pattern.num_q_blocks, q.device
        if backend == "auto":
            # The top-k follows the attention backend: the fused kernels with the kernels (triton on GPU,
            # native on CPU, where "auto" picks it if it builds), the PyTorch path with the PyTorch paths.
            backend = {"triton": "triton", "native": "auto"}.get(ctx.backend, "naive")
        if self.top_k > 0:
            top = block_topk(q, summaries, self.fused_score, self.top_k, qbs, pattern.window_lo,
                             pattern.sink_lo.expand(b), pattern.sink_hi.expand(b), pattern.has_key, backend=backend)
        else:
            top = torch.full((b, hq, nqb, 0), -1, dtype=torch.int32, device=dev)
        static, kept = pattern.static_ids(b)  # [B, 1, Qblk, W]
        ids = torch.cat([
            torch.where(kept, static, nkb).expand(b, hq, -1, -1),
            torch.where(top >= 0, top.long(), nkb),
        ], dim=-1).sort(dim=-1).values
        kept = ids < nkb
        indices = torch.where(kept, ids, -1).to(torch.int32).contiguous()
        return Selection(indices, kept.sum(-1, dtype=torch.int32), qbs, self.block_size)

    def score(self, q: Tensor, summaries: Tensor) -> Tensor:
        """Per-query block scores: ``q [B, Hq, Tq, D]``, summaries ``[B, Hkv, Nblk, R, D]`` -> ``[B, Hq, Tq, Nblk]``."""
        raise NotImplementedError

    def block_mask(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        b, hq, tq, _ = q.shape
        static = self.static_mask(tq, ctx, qbs)
        scores = self.block_scores(q, summaries, ctx, qbs, prepared)  # [B, Hq, Qblk, Nblk]
        if self.share_kv_heads:
            scores = scores.view(b, ctx.num_kv_heads, -1, *scores.shape[2:]).amax(dim=2)
        return static | top_blocks(scores, self.eligible_mask(tq, ctx, qbs, static), self.top_k)

    def block_scores(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        """Score of every key block for every query block: ``[B, Hq, Qblk, Nblk]`` float32 (higher = keep).

        The default pools :meth:`score` over each query block's queries; methods whose score is not per query
        token (hierarchical, clustered, adaptive) override this instead.
        """
        return self.pooled_scores(q, self.checked_summaries(summaries, q.shape[0], ctx), qbs, ctx)

    def pooled_scores(self, q: Tensor, summaries: Tensor, qbs: int, ctx: SelectionContext | None = None) -> Tensor:
        """Max over each query block's queries of the per-query scores: ``[B, Hq, Qblk, Nblk]`` float32.

        The max keeps a block that any single query of the block needs, the closest a shared selection gets
        to per-token retrieval. Under a position policy (``ctx.reposition``) far blocks of a method with
        ``rotatable_scores`` are scored at the policy's capped distance.
        """
        b, hq, tq, _ = q.shape
        nqb = -(-tq // qbs)
        scores = self.score(q, summaries)  # [B, Hq, Tq, Nblk]
        if ctx is not None and ctx.reposition is not None and self.rotatable_scores:
            scores = ctx.reposition.capped_scores(self.score, q, summaries, scores, ctx.q_offset, self.block_size)
        # Padding rows of the last block take -inf so they never win the max.
        scores = torch.nn.functional.pad(scores, (0, 0, 0, nqb * qbs - tq), value=float("-inf"))
        return scores.view(b, hq, nqb, qbs, -1).amax(dim=3)


def top_blocks(scores: Tensor, eligible: Tensor, k: int) -> Tensor:
    """The ``k`` highest-scoring eligible blocks of each row (fewer where fewer are eligible).

    Args:
        scores: ``[B, H, Qblk, Nblk]`` float; higher is better.
        eligible: bool, broadcastable to ``scores``.

    Returns:
        ``[B, H, Qblk, Nblk]`` bool.
    """
    # A non-finite score (NaN, 0 * inf in a bound) is never picked and must not take a slot from a real one.
    scores = scores.masked_fill(~eligible | ~torch.isfinite(scores), float("-inf"))
    picked = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    k = min(k, scores.shape[-1])
    if k > 0:
        top = scores.topk(k, dim=-1)
        picked = picked.scatter(-1, top.indices, torch.isfinite(top.values))
    return picked
