"""Attention under a position policy as exact passes, one per region, merged by log-sum-exp.

A policy that tells near and far keys apart by whole key blocks (Self-Extend, InfLLM, Dual Chunk Attention;
:meth:`~longattn.core.positions.PositionPolicy.regions`) sees every key of a region with one query shift per
row and, for far regions, one shift per key. So each region is plain block-sparse attention of re-rotated
queries over (once) re-rotated keys, through the fastest backend there is (the native C kernel on CPU, Triton
on GPU); the regions cover disjoint key blocks, so their ``(out, lse)`` merge exactly
(:func:`~longattn.ops.merge.merge_attention`). Every selected pair is scored once, where the gather path's
policy code scores each far pair twice (real and moved positions) in PyTorch. The gather path stays the
reference these passes are tested against.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from longattn.core.positions import Region
from longattn.core.reposition import Reposition
from longattn.core.selection import Selection
from longattn.ops.merge import merge_attention

Operator = Callable[..., tuple[Tensor, Tensor]]


def region_selection(selection: Selection, region: Region) -> Selection | None:
    """The part of ``selection`` inside ``region`` (block ids ascending, -1 padded), or None if it is empty.

    ``selection.indices [B, H, Qblk, S]``; the region's bounds are ``[Qblk]``.
    """
    idx = selection.indices.long()
    inside = (idx >= 0) & (idx >= region.lo.view(1, 1, -1, 1))
    if region.hi is not None:
        inside &= idx < region.hi.view(1, 1, -1, 1)
    counts = inside.sum(-1, dtype=torch.int32)
    width = int(counts.max()) if counts.numel() else 0
    if width == 0:
        return None
    sentinel = torch.iinfo(torch.int64).max
    ids = torch.where(inside, idx, sentinel).sort(dim=-1).values[..., :width]
    ids = torch.where(ids == sentinel, -1, ids).to(torch.int32).contiguous()
    return Selection(ids, counts, selection.query_block_size, selection.kv_block_size)


def regioned_attention(
    q: Tensor, k: Tensor, v: Tensor, selection: Selection, scale: float | None, key_mask: Tensor | None,
    q_offset: int, reposition: Reposition, op: Operator, moved_keys: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention under ``reposition`` as one ``op`` pass per region of its policy.

    Args:
        q: ``[B, Hq, Tq, D]`` post-RoPE queries at positions ``q_offset + t``; k, v: ``[B, Hkv, Tk, D]``.
        selection: ``[B, H, Qblk, S]`` the blocks each query block reads (``dense_heads`` ignored).
        op: a block-sparse operator with :func:`~longattn.ops.block_sparse.block_sparse_attention`'s
            signature (without ``reposition``), e.g. the native or naive backend.
        moved_keys: ``k`` with the policy's per-token shift (``reposition.shifted_keys(k)``), when the caller
            keeps it between steps (a decode step then rotates one key, not the cache); None: computed here.

    Returns:
        ``out [B, Hq, Tq, D]`` and ``lse [B, Hq, Tq]`` float32, as the gather path computes them with the same
        ``reposition``. Raises ``ValueError`` when a far key would be seen beyond the trained window.
    """
    tq = q.shape[2]
    qbs, bs, nqb = selection.query_block_size, selection.kv_block_size, selection.num_q_blocks
    # Padding rows of the last query block take the last real position: they are never read.
    rows = (q_offset + torch.arange(nqb * qbs, device=q.device)).clamp(max=q_offset + tq - 1).view(nqb, qbs)
    regions = reposition.policy.regions(rows, reposition.window, bs)
    if regions is None:
        raise ValueError(f"positions={reposition.policy.name!r} moves single blocks; it runs on the gather path")
    plain = selection.without_dense_heads()
    moved_k = moved_keys
    out: Tensor | None = None
    lse: Tensor | None = None
    for region in regions:
        part = region_selection(plain, region)
        if part is None:
            continue
        keys, queries = k, q
        if region.moved_keys:
            if moved_k is None:
                moved_k = reposition.shifted_keys(k)
            keys = k if moved_k is None else moved_k
        if region.moved_keys or region.query_shift is not None:
            _check_distances(part, region, rows, reposition)
        if region.query_shift is not None:
            queries = reposition.rotate(q, region.query_shift.reshape(-1)[:tq].view(1, 1, tq))
        o, l = op(queries, keys, v, part, scale, causal=True, key_mask=key_mask, q_offset=q_offset)
        out, lse = (o, l) if out is None else merge_attention(out, lse, o, l)  # type: ignore[arg-type]
    if out is None or lse is None:  # an empty selection: no key seen anywhere
        b, hq, _, d = q.shape
        return q.new_zeros(b, hq, tq, v.shape[-1]), torch.full((b, hq, tq), float("-inf"), device=q.device)
    return out, lse


def _check_distances(part: Selection, region: Region, rows: Tensor, reposition: Reposition) -> None:
    """Raise when a key of ``part`` would be seen at or beyond the trained window: the farthest pair of a query
    block is its latest query against its earliest key (key positions only grow within a block and, by the
    policies' shifts, from block to block inside a region)."""
    bs = part.kv_block_size
    first = part.indices.long().clamp(min=0) * bs  # [B, H, Qblk, S] first token of each block
    shift = reposition.policy.token_shift(first) if region.moved_keys else None
    key_at = first if shift is None else first + shift
    key_at = torch.where(part.indices >= 0, key_at, torch.iinfo(torch.int64).max).amin(dim=(0, 1, 3))  # [Qblk]
    q_at = rows if region.query_shift is None else rows + region.query_shift
    seen = key_at < torch.iinfo(torch.int64).max
    if not bool(seen.any()):
        return
    farthest = int((q_at.amax(dim=1) - key_at)[seen].max())
    if farthest >= reposition.rope.trained_window:
        raise ValueError(reposition._too_far(farthest, int(rows.max()) + 1))
