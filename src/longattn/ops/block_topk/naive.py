"""Block scoring + top-k in plain PyTorch: the definition the fused Triton kernel is tested against, and
backend "naive" (what runs off CUDA).

Each query block scores every key block it may retrieve against the block's summary, max-pooled over the
block's queries, and keeps the ``top_k`` best. Retrievable = before the query block's local window, outside
the sink blocks, and holding a valid key. This is exactly what ``TopKMethod`` selects beyond its static
sinks + window for the "mean" (``q · mean``) and "minmax" (Quest's bound) scores. Plain already: every score
computed densely in float32 and ``torch.topk``; query blocks are only taken in chunks to bound memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

KINDS = ("mean", "minmax")

# Elements of one chunk's per-query score tensor [B, Hq, rows, Nblk]: memory stays linear in the context.
_CHUNK_ELEMENTS = 1 << 22


def check_topk_inputs(
    q: Tensor, summaries: Tensor, kind: str, top_k: int, query_block_size: int, limit: Tensor, sink_lo: Tensor,
    sink_hi: Tensor, has_key: Tensor | None,
) -> None:
    """Validate :func:`block_topk_naive`'s arguments; errors name the argument and what it must be."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, Tq, D], got shape {tuple(q.shape)}")
    b, hq, tq, d = q.shape
    reps = 1 if kind == "mean" else 2
    if summaries.dim() != 5 or summaries.shape[0] != b or summaries.shape[3] < reps or summaries.shape[4] != d:
        raise ValueError(f"summaries must be [B={b}, Hkv, Nblk, R>={reps}, D={d}] for kind {kind!r}, "
                         f"got {tuple(summaries.shape)}")
    if hq % summaries.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of the summaries' KV heads ({summaries.shape[1]})")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if not isinstance(query_block_size, int) or query_block_size < 1:
        raise ValueError(f"query_block_size must be an int >= 1, got {query_block_size!r}")
    nqb, nkb = -(-tq // query_block_size), summaries.shape[2]
    if limit.shape != (nqb,):
        raise ValueError(f"limit must be [Qblk={nqb}] (first non-retrievable block of each query block), got "
                         f"{tuple(limit.shape)}")
    if sink_lo.shape != (b,) or sink_hi.shape != (b,):
        raise ValueError(f"sink_lo and sink_hi must be [B={b}], got {tuple(sink_lo.shape)} and {tuple(sink_hi.shape)}")
    if has_key is not None and (has_key.dtype != torch.bool or has_key.shape != (b, nkb)):
        raise ValueError(f"has_key must be a bool tensor [B={b}, Nblk={nkb}], got {has_key.dtype} {tuple(has_key.shape)}")


def block_topk_naive(
    q: Tensor,
    summaries: Tensor,
    kind: str,
    top_k: int,
    query_block_size: int,
    limit: Tensor,
    sink_lo: Tensor,
    sink_hi: Tensor,
    has_key: Tensor | None = None,
) -> Tensor:
    """The ``top_k`` retrievable key blocks of every query block, best first.

    Args:
        q: ``[B, Hq, Tq, D]`` post-RoPE queries; query block ``j`` holds rows ``[j*query_block_size, ...)``.
        summaries: ``[B, Hkv, Nblk, R, D]`` float block summaries: R=1 ``mean`` key, or R=2 ``(min, max)``.
        kind: "mean" (score ``q · mean``) or "minmax" (``sum_d max(q_d·min_d, q_d·max_d)``).
        limit: ``[Qblk]`` int: blocks ``>= limit[j]`` (the local window and later) are not retrievable.
        sink_lo, sink_hi: ``[B]`` int: blocks in ``[sink_lo, sink_hi)`` are sinks (kept anyway), not retrieved.
        has_key: ``[B, Nblk]`` bool, False for blocks of padding only; None: every block has keys.

    Returns:
        ``[B, Hq, Qblk, top_k]`` int32 block ids by descending pooled score, ``-1`` where fewer are retrievable.
    """
    check_topk_inputs(q, summaries, kind, top_k, query_block_size, limit, sink_lo, sink_hi, has_key)
    b, hq, tq, d = q.shape
    hkv, nkb = summaries.shape[1], summaries.shape[2]
    qbs = query_block_size
    nqb = -(-tq // qbs)
    s = summaries.float()
    blocks = torch.arange(nkb, device=q.device)
    ok_b = (blocks.view(1, -1) < sink_lo.view(-1, 1)) | (blocks.view(1, -1) >= sink_hi.view(-1, 1))  # [B, Nblk]
    if has_key is not None:
        ok_b = ok_b & has_key
    out = torch.full((b, hq, nqb, top_k), -1, dtype=torch.int32, device=q.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, b * hq * nkb * qbs))
    for first in range(0, nqb, step):
        last = min(nqb, first + step)
        rows = q[:, :, first * qbs: min(last * qbs, tq)].float()
        g = rows.view(b, hkv, hq // hkv, rows.shape[2], d)
        if kind == "mean":
            sc = torch.einsum("bhgtd,bhnd->bhgtn", g, s[:, :, :, 0])
        else:
            sc = torch.einsum("bhgtd,bhnd->bhgtn", g.clamp(min=0), s[:, :, :, 1]) + torch.einsum(
                "bhgtd,bhnd->bhgtn", g.clamp(max=0), s[:, :, :, 0])
        sc = sc.reshape(b, hq, -1, nkb)
        sc = torch.nn.functional.pad(sc, (0, 0, 0, (last - first) * qbs - sc.shape[2]), value=float("-inf"))
        pooled = sc.view(b, hq, last - first, qbs, nkb).amax(dim=3)  # [B, Hq, C, Nblk]
        ok = ok_b.view(b, 1, 1, nkb) & (blocks.view(1, 1, 1, -1) < limit[first:last].view(1, 1, -1, 1))
        # Non-finite scores (NaN, or +-inf from 0 * inf in a bound) are never picked and never take a slot.
        pooled = pooled.masked_fill(~ok | ~torch.isfinite(pooled), float("-inf"))
        k = min(top_k, nkb)
        top = pooled.topk(k, dim=-1)
        ids = torch.where(torch.isfinite(top.values), top.indices, -1).to(torch.int32)
        out[:, :, first:last, :k] = ids
    return out
