"""Block-sparse attention, plainly: the definition every backend is tested against (backend "naive").

For each query block: a ``[B, Hq, rows, Tk]`` mask of the keys its rows may see (selected blocks, causal,
``key_mask``) and a masked dense softmax in float32. Memory is per query block, never a ``[Tq, Tk]`` matrix;
every key is scored, so it is slow: tests, and end-to-end checks of the fast paths (``backend="naive"``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.core.reposition import Reposition
from longattn.core.rope import rotate
from longattn.core.pattern import window_first_block
from longattn.core.selection import Selection
from longattn.ops.block_sparse.checks import check_inputs


def block_sparse_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    scale: float | None = None,
    *,
    causal: bool = True,
    key_mask: Tensor | None = None,
    q_offset: int | None = None,
    reposition: Reposition | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of each query block over its selected key blocks.

    Args:
        q: ``[B, Hq, Tq, D]`` queries; query row ``i`` sits at position ``q_offset + i``.
        k, v: ``[B, Hkv, Tk, D]`` keys and values (not repeated for GQA; ``Hq = G * Hkv``).
        selection: indices ``[B, H, Qblk, S]`` with ``H`` in ``{Hq, Hkv}``; when ``H == Hkv`` the group's
            query heads share one selection row. ``selection.dense_heads`` is an execution hint of the
            dispatcher (:func:`~longattn.ops.block_sparse.block_sparse_attention`); here every head is computed
            from its selected blocks.
        scale: softmax scale, default ``1/sqrt(D)``.
        causal: mask keys after each query's position (inside blocks that cross the diagonal).
        key_mask: ``[B, Tk]`` bool, False for keys no query may attend (padding).
        q_offset: absolute position of query row 0; default ``Tk - Tq`` (queries are the newest keys).
        reposition: a position policy bound to the model's RoPE (context extension): keys of selected blocks
            before each query block's local window ("far" keys) are scored at the distance the policy gives
            them, ``q``/``k`` being post-RoPE; None keeps every real position. Needs ``causal=True``.

    Returns:
        ``out [B, Hq, Tq, D]`` in q's dtype and ``lse [B, Hq, Tq]`` float32 (natural log). A row with no
        attendable key gets ``out = 0`` and ``lse = -inf`` so that merging stays exact.
    """
    offset = check_inputs(q, k, v, selection, key_mask, q_offset)
    if reposition is not None and not causal:
        raise ValueError("reposition= (a position policy) re-encodes distances to earlier keys; it needs causal=True")
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    bs, qbs = selection.kv_block_size, selection.query_block_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nkb = -(-tk // bs)
    # Everything per query head, in float32: query head h reads KV head h // (Hq / Hkv) and selection head
    # h // (Hq / H).
    blocks = selection.to_mask(nkb).repeat_interleave(hq // selection.num_heads, dim=1)  # [B, Hq, Qblk, Nblk]
    kf = k.float().repeat_interleave(hq // hkv, dim=1)  # [B, Hq, Tk, D]
    vf = v.float().repeat_interleave(hq // hkv, dim=1)
    key_pos = torch.arange(tk, device=q.device)  # [Tk]
    key_block = key_pos // bs

    out = torch.zeros(b, hq, tq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, tq), float("-inf"), dtype=torch.float32, device=q.device)
    for j in range(selection.num_q_blocks):
        rows = torch.arange(j * qbs, min((j + 1) * qbs, tq), device=q.device)  # query rows of block j
        row_pos = offset + rows  # [R]
        selected = blocks[:, :, j, key_block]  # [B, Hq, Tk]: key lies in a block this query block selected
        allowed = selected.unsqueeze(2).expand(b, hq, rows.numel(), tk)  # [B, Hq, R, Tk]
        if causal:
            allowed = allowed & (key_pos.view(1, -1) <= row_pos.view(-1, 1))
        if key_mask is not None:
            allowed = allowed & key_mask.view(b, 1, 1, tk)
        qj = q[:, :, rows].float() * scale  # [B, Hq, R, D]
        scores = qj @ kf.transpose(-1, -2)  # [B, Hq, R, Tk]
        if reposition is not None:
            scores = _repositioned(scores, qj, kf, blocks[:, :, j], allowed, row_pos, reposition, bs)
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse_j = torch.logsumexp(scores, dim=-1)  # [B, Hq, R]; -inf where a row sees no key
        p = torch.where(allowed, torch.exp(scores - lse_j.unsqueeze(-1)), 0.0)
        # Values no row may see are zeroed before the product: p = 0 there, but 0 * NaN (or inf) would be NaN.
        seen = allowed.any(dim=2).unsqueeze(-1)  # [B, Hq, Tk, 1]
        out[:, :, rows] = p @ torch.where(seen, vf, 0.0)
        lse[:, :, rows] = lse_j
    return out.to(q.dtype), lse


def _repositioned(
    scores: Tensor, q: Tensor, k: Tensor, selected_blocks: Tensor, allowed: Tensor, row_pos: Tensor,
    reposition: Reposition, bs: int,
) -> Tensor:
    """``scores [B, Hq, R, Tk]`` with every far key scored where the policy moves it and its query.

    Args:
        q: ``[B, Hq, R, D]`` scaled float32 queries of one query block; k: ``[B, Hq, Tk, D]`` float32 keys.
        selected_blocks: ``[B, Hq, Nblk]`` bool, the blocks this query block selected.
        allowed: ``[B, Hq, R, Tk]`` the (row, key) pairs attended at all; row_pos: ``[R]`` query positions.

    A far key (a selected block before the query block's local window) at position ``p`` in block ``n`` is seen
    at ``p + token_shift(p) + block_shift(n)`` by a query seen at ``r + query_shift(r)``; RoPE depends only on
    the difference, so the pair is scored as ``rotate(q, query_shift) . rotate(k, token_shift + block_shift)``.
    """
    policy = reposition.policy
    b, hq, tk = k.shape[0], k.shape[1], k.shape[2]
    nkb = selected_blocks.shape[-1]
    lo = window_first_block(row_pos[:1], reposition.window, bs)  # [1]: first block of the local window
    ids = torch.arange(nkb, device=k.device)
    far_blocks = selected_blocks & (ids < lo)  # [B, Hq, Nblk]
    key_pos = torch.arange(tk, device=k.device)
    key_block = key_pos // bs

    key_shift = torch.zeros(b, hq, tk, dtype=torch.long, device=k.device)
    token = policy.token_shift(key_pos)  # [Tk] or None
    if token is not None:
        key_shift = key_shift + token
    # The hook's layout: every block id (ascending, so LongHeads keeps the original order of the far ones).
    block = policy.block_shift(ids.expand(b, hq, 1, nkb), far_blocks.unsqueeze(2), lo, bs)  # [B, Hq, 1, Nblk, 1]
    if block is not None:
        key_shift = key_shift + block[:, :, 0, key_block, 0]
    query = policy.query_shift(row_pos.view(1, -1), lo, reposition.window, bs)  # [1, R] or None
    query_shift = torch.zeros_like(row_pos) if query is None else query.view(-1)

    inv_freq = reposition.rope.inv_freq.to(k.device)
    far_scores = rotate(q, query_shift.view(1, 1, -1), inv_freq) @ rotate(k, key_shift, inv_freq).transpose(-1, -2)
    far = far_blocks[:, :, key_block].unsqueeze(2)  # [B, Hq, 1, Tk]
    seen = far & allowed
    if policy.changes_positions and bool(seen.any()):
        distance = (row_pos + query_shift).view(1, 1, -1, 1) - (key_pos + key_shift).unsqueeze(2)
        farthest = int(distance[seen].max())
        if farthest >= reposition.rope.trained_window:
            raise ValueError(reposition._too_far(farthest, int(row_pos.max()) + 1))
    return torch.where(far, far_scores, scores)
