"""HiP: each query block finds its top-k key blocks by halving spans of the key range, O(T log T)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longattn.methods.base import SelectionContext, group_queries
from longattn.methods.topk import TopKMethod


@dataclass
class HiP(TopKMethod):
    """Hierarchically Pruned Attention, training-free: each query block cuts its eligible key range into
    ``top_k`` spans, then repeatedly halves every surviving span, scores each half by the max over the block's
    queries of ``q · mean key of the half`` and keeps the ``top_k`` best halves, until every survivor is one
    key block. Every block is scored inside some span, and O(log T) levels of ``2 * top_k`` halves replace
    MoBA's scan of all blocks. Paper: HiP Attention, https://arxiv.org/abs/2406.09827
    """

    block_size: int = 16
    sink_tokens: int = 16
    window: int = 128
    top_k: int = 32
    """Spans kept at every level, hence key blocks retrieved per query block (32 x 16 = 512 tokens) beyond the
    sinks and the window."""

    name: ClassVar[str] = "hip"
    paper: ClassVar[str] = (
        "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning "
        "https://arxiv.org/abs/2406.09827"
    )
    summary: ClassVar[str | None] = "mean"

    def block_mask(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        """``q [B, Hq, Tq, D]``, summaries ``[B, Hkv, Nblk, 1, D]`` -> ``[B, H, Qblk, Nblk]`` bool, H = Hq or Hkv."""
        b, hq, tq, d = q.shape
        hkv, nkb = ctx.num_kv_heads, -(-ctx.kv_len // self.block_size)
        if summaries is None or summaries.dim() != 5 or summaries.shape[:3] != (b, hkv, nkb):
            got = None if summaries is None else tuple(summaries.shape)
            raise ValueError(f"method 'hip' needs mean block summaries [B={b}, Hkv={hkv}, Nblk={nkb}, 1, D], got {got}")
        static = self.static_mask(tq, ctx, qbs)  # [B or 1, 1, Qblk, Nblk]
        heads = hkv if self.share_kv_heads else hq
        k = min(self.top_k, nkb)
        if k == 0:
            return static.expand(b, heads, -1, -1)
        eligible = self.eligible_mask(tq, ctx, qbs, static)  # [B or 1, 1, Qblk, Nblk]
        queries = self._query_pool(q, hkv, qbs)  # [B, Hkv, Gs, Qblk, P, D]
        prefix, count = self._prefix_sums(summaries, eligible)
        start, end = initial_spans(eligible, k)  # [B or 1, 1, Qblk, K]
        shape = (b, hkv, queries.shape[2], *start.shape[2:])
        start, end = start.unsqueeze(1).expand(shape), end.unsqueeze(1).expand(shape)  # [B, Hkv, Gs, Qblk, K]
        # q · (P[e] - P[s]) = q · P[e] - q · P[s]: the products at a span's ends carry over to its halves, so
        # each level computes only the products at the new midpoints.
        z_start, z_end = _products(queries, prefix, start), _products(queries, prefix, end)  # [..., Qblk, P, K]
        while bool((end - start > 1).any()):
            # A one-block span splits into an empty half and itself, so finished spans keep competing.
            mid = start + (end - start) // 2
            z_mid = _products(queries, prefix, mid)
            c_start, c_mid, c_end = (_counts(count, i) for i in (start, mid, end))
            n = torch.cat((c_mid - c_start, c_end - c_mid), dim=-1)  # eligible blocks per half: [..., 2K]
            best = torch.cat(((z_mid - z_start).amax(dim=-2), (z_end - z_mid).amax(dim=-2)), dim=-1)
            # The max over queries divided by the half's positive block count is the max of the means.
            scores = torch.where(n > 0, best / n.clamp(min=1), float("-inf"))
            top = scores.topk(k, dim=-1, sorted=False)
            z_index = top.indices.unsqueeze(-2).expand_as(z_start)
            z_start = torch.cat((z_start, z_mid), dim=-1).gather(-1, z_index)
            z_end = torch.cat((z_mid, z_end), dim=-1).gather(-1, z_index)
            start = torch.cat((start, mid), dim=-1).gather(-1, top.indices)
            end = torch.cat((mid, end), dim=-1).gather(-1, top.indices)
            # Where fewer than k halves hold an eligible block, the losers picked to fill k are dropped.
            end = torch.where(torch.isfinite(top.values), end, start)
        picked = torch.zeros(*shape[:-1], nkb + 1, dtype=torch.bool, device=q.device)
        picked.scatter_(-1, torch.where(end > start, start, nkb), True)  # empty spans land in the spare column
        picked = picked[..., :nkb].reshape(b, heads, -1, nkb)
        return static | (picked & eligible)

    def _query_pool(self, q: Tensor, num_kv_heads: int, qbs: int) -> Tensor:
        """The queries whose max scores a span: ``[B, Hq, Tq, D] -> [B, Hkv, Gs, Qblk, P, D]`` float32.

        ``Gs, P`` is ``G, qbs`` per query head, ``1, G * qbs`` when a GQA group shares one selection (the max
        over the group's heads, as :meth:`TopKMethod.block_mask` takes it).
        """
        g = group_queries(q, num_kv_heads)  # [B, Hkv, G, Tq, D]
        b, h, gs, tq, d = g.shape
        nqb = -(-tq // qbs)
        # The last block's missing rows repeat its last query, which leaves every max unchanged.
        g = torch.cat((g, g[:, :, :, -1:].expand(-1, -1, -1, nqb * qbs - tq, -1)), dim=3)
        g = g.view(b, h, gs, nqb, qbs, d)
        if self.share_kv_heads:
            return g.transpose(2, 3).reshape(b, h, 1, nqb, gs * qbs, d)
        return g

    @staticmethod
    def _prefix_sums(summaries: Tensor, eligible: Tensor) -> tuple[Tensor, Tensor]:
        """Prefix sums of the eligible blocks' mean keys and of their number, so any span's mean costs O(1).

        Blocks eligible for no query block of the chunk are left out; within a query block's own range they are
        exactly its ineligible blocks, because eligibility only narrows (the window start) from row to row.
        Summed in float64 and rounded once to float32: a span's score then errs by about ``Nblk * 2**-24`` of
        ``|q| * |mean key|`` (5e-4 at 128k tokens), far below the score gaps that decide a top-k.

        Returns:
            ``[B, Hkv, Nblk + 1, D]`` float32 sums and ``[B or 1, 1, Nblk + 1]`` int64 counts.
        """
        used = eligible.any(dim=2)  # [B or 1, 1, Nblk]
        means = summaries[:, :, :, 0].double() * used.unsqueeze(-1)  # [B, Hkv, Nblk, D]
        prefix = torch.nn.functional.pad(means.cumsum(dim=2), (0, 0, 1, 0)).float()
        count = torch.nn.functional.pad(used.long().cumsum(dim=-1), (1, 0))
        return prefix, count


def initial_spans(eligible: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Cut each row's eligible range into ``min(k, its length)`` spans of nearly equal length.

    The range runs from a row's first eligible block to its last; together the spans cover it exactly, so no
    block escapes scoring.

    Args:
        eligible: ``[..., Nblk]`` bool.
        k: spans per row, ``>= 1``.

    Returns:
        ``(start, end)``, each ``[..., k]`` int64: spans ``[start, end)`` in key blocks; unused spans are empty
        (``start == end``).
    """
    nkb = eligible.shape[-1]
    flags = eligible.int()
    lo = flags.argmax(dim=-1, keepdim=True)
    hi = nkb - flags.flip(-1).argmax(dim=-1, keepdim=True)
    n = torch.where(eligible.any(dim=-1, keepdim=True), hi - lo, 0)  # [..., 1]
    parts = n.clamp(max=k)
    i = torch.arange(k, device=eligible.device)
    start = lo + torch.minimum(i, parts) * n // parts.clamp(min=1)
    end = lo + torch.minimum(i + 1, parts) * n // parts.clamp(min=1)
    return start, end


def _products(queries: Tensor, prefix: Tensor, points: Tensor) -> Tensor:
    """``q · P[j]`` for every query of a row and every prefix point ``j`` of that row.

    Args:
        queries: ``[B, Hkv, Gs, Qblk, P, D]``.
        prefix: ``[B, Hkv, Nblk + 1, D]`` prefix sums of block mean keys.
        points: ``[B, Hkv, Gs, Qblk, K]`` indices into ``prefix``.

    Returns:
        ``[B, Hkv, Gs, Qblk, P, K]`` float32.
    """
    b, h, gs, nqb, k = points.shape
    p, d = queries.shape[-2:]
    # Row ids into prefix viewed as [B * Hkv * (Nblk + 1), D]: index_select copies whole rows, unlike gather.
    rows = points.reshape(b, h, -1) + torch.arange(b * h, device=points.device).view(b, h, 1) * prefix.shape[2]
    keys = prefix.reshape(-1, d).index_select(0, rows.view(-1)).view(-1, k, d)  # [rows, K, D]
    return torch.bmm(queries.reshape(-1, p, d), keys.transpose(1, 2)).view(b, h, gs, nqb, p, k)


def _counts(count: Tensor, points: Tensor) -> Tensor:
    """Eligible blocks before each point: ``count [B or 1, 1, Nblk + 1]``, points ``[B, ...]`` -> ``[B, ...]``."""
    b = points.shape[0]
    return count.expand(b, -1, -1).gather(2, points.reshape(b, 1, -1)).view(points.shape)
