"""Block-sparse attention in PyTorch by gathering the selected key blocks: backend "gather".

The optimised PyTorch path (its plain definition is naive.py, which the tests compare it against): query
blocks are processed in chunks; each chunk copies only its selected key blocks, each as one run of the cache,
so peak memory is O(chunk · S · block) and no T×T matrix is ever built. On CPU ``auto`` picks it where the
native kernel cannot be built (native.py, several times faster: it reads blocks without copying them), and
always under a position policy: it is the only fast path that applies them (``reposition=``). The gather loop
(`gathered_attention`) is shared with the fused CPU backend (cpu.py), which differs only in how a chunk's
masked softmax is computed.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from longattn.core.reposition import Reposition
from longattn.core.selection import Selection
from longattn.ops.block_sparse.checks import check_inputs

# Elements of the per-chunk score tensor: 8 MiB of float32 keeps a chunk's working set near the caches
# (measured best on a 2-core CPU between 2^18 and 2^23) while amortising Python overhead.
_CHUNK_ELEMENTS = 1 << 21

# attend(q [..., rows, D] scaled fp32, k, v [..., keys, D], key_pos [..., 1, keys], row_pos [..., rows, 1],
#        far = None | (q_far [..., rows, D], k_far [..., keys, D], mask [..., 1, keys]))
#   -> (out [..., rows, D] fp32, lse [..., rows]); key j is visible to row r iff key_pos[j] <= row_pos[r];
#   where given, keys in `mask` are scored as q_far . k_far (queries and keys a position policy moved).
Far = tuple[Tensor, Tensor, Tensor]
Attend = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, "Far | None"], tuple[Tensor, Tensor]]


def block_sparse_attention_gather(
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
    """Same signature and contract as :func:`~longattn.ops.block_sparse.naive.block_sparse_attention_naive`
    (its plain definition), computed by chunked gathers of the selected blocks.

    ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``, selection ``[B, H, Qblk, S]`` with H in {Hq, Hkv} ->
    ``out [B, Hq, Tq, D]`` in q's dtype, ``lse [B, Hq, Tq]`` float32 (``0`` and ``-inf`` on rows without a
    key). ``reposition``: a bound position policy; far keys are re-rotated (``q``/``k`` post-RoPE).
    """
    return gathered_attention(q, k, v, selection, scale, causal, key_mask, q_offset, attend_plain, reposition)


def gathered_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    scale: float | None,
    causal: bool,
    key_mask: Tensor | None,
    q_offset: int | None,
    attend: Attend,
    reposition: Reposition | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked gather of the selected key blocks, handing each chunk to ``attend``. Shapes as in
    :func:`block_sparse_attention_gather`; only the selected keys are copied, plus one rotated copy of
    ``k`` when a position policy shifts keys by their own position (infllm, self_extend: O(T·D), not per query).
    """
    offset = check_inputs(q, k, v, selection, key_mask, q_offset)
    if reposition is not None and not causal:
        raise ValueError("reposition= (a position policy) re-encodes distances to earlier keys; it needs causal=True")
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    hs = selection.num_heads
    bs, qbs = selection.kv_block_size, selection.query_block_size
    nqb = selection.num_q_blocks
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    heads_per_sel = hq // hs  # query heads that share one selection row
    sel_per_kv = hs // hkv  # selection heads per KV head
    device = q.device
    beyond = tk + 1  # a position after every query: marks invalid keys

    # Each selected block is copied as one [bs, D] run of the cache. `unfold` views the flat cache as
    # overlapping windows of bs tokens starting at every token, so a block is a single row to index_select
    # (twice as fast as gathering bs token rows) and nothing is padded or copied beforehand. A partial last
    # block is read as the window ending at Tk; its tokens of the previous block are masked out and zeroed
    # (an unselected block's NaN or inf would otherwise reach the output as 0 * NaN in p @ V).
    runs = k.is_contiguous() and v.is_contiguous() and tk >= bs
    # Query blocks that read the partial last block (one host sync, only when there is one).
    nkb = -(-tk // bs)
    reads_last = [False] * nqb
    if runs and tk % bs:
        reads_last = (selection.indices == nkb - 1).any(dim=3).any(dim=(0, 1)).tolist()
    # A position policy with a per-token key shift rotates the whole cache once; far keys are gathered from it.
    k_moved = reposition.shifted_keys(k) if reposition is not None else None
    if runs:
        kwin = k.reshape(-1).unfold(0, bs * d, d)  # [B*Hkv*Tk - bs + 1, bs*D]
        vwin = v.reshape(-1).unfold(0, bs * d, d)
        mwin = None if k_moved is None else k_moved.reshape(-1).unfold(0, bs * d, d)
    else:  # a strided cache or a cache shorter than one block: gather token rows
        kwin, vwin = k.reshape(b * hkv * tk, d), v.reshape(b * hkv * tk, d)
        mwin = None if k_moved is None else k_moved.reshape(b * hkv * tk, d)
    valid_rows = None if key_mask is None else key_mask.reshape(b * tk)

    # Rows of one selection head: its query heads x the query block's tokens.  q: [B, Hq, Tq, D] ->
    # [B, Hs, Qblk, heads_per_sel * qbs, D]; the softmax scale is folded into q once.
    pad_q = nqb * qbs - tq
    qr = (torch.nn.functional.pad(q, (0, 0, 0, pad_q)).float() * scale).view(b, hs, heads_per_sel, nqb, qbs, d)
    qr = qr.permute(0, 1, 3, 2, 4, 5).reshape(b, hs, nqb, heads_per_sel * qbs, d)
    rows = heads_per_sel * qbs
    # Position of each row: [Qblk, rows]; without causality every row may see every valid key.
    row_pos = offset + (torch.arange(nqb, device=device) * qbs).unsqueeze(1) + (
        torch.arange(rows, device=device) % qbs
    ).unsqueeze(0)
    if not causal:
        row_pos = torch.full_like(row_pos, tk)

    out = q.new_zeros((b, hs, nqb, rows, d))
    lse = torch.full((b, hs, nqb, rows), float("-inf"), dtype=torch.float32, device=device)
    bi = torch.arange(b, device=device).view(b, 1, 1, 1, 1)
    row_base = (bi * hkv + (torch.arange(hs, device=device) // sel_per_kv).view(1, hs, 1, 1, 1)) * tk
    in_block = torch.arange(bs, device=device)

    per_block = max(1, b * hs * rows * bs)
    # One host sync for all widths; the width of a chunk is its own max count, so early (short) query blocks
    # do not pay for late (long) ones.
    widths = selection.counts.amax(dim=(0, 1)).tolist()
    start = 0
    while start < nqb:
        # Grow the chunk while its score tensor stays under budget.
        width = widths[start]
        stop = start + 1
        while stop < nqb:
            w = max(width, widths[stop])
            if (stop + 1 - start) * w * per_block > _CHUNK_ELEMENTS:
                break
            width, stop = w, stop + 1
        if width > 0:
            c = stop - start
            idx = selection.indices[:, :, start:stop, :width].long()  # [B, Hs, C, W]
            first = idx * bs
            if runs:
                window = first.clamp(0, tk - bs)  # where the copied run starts
                pos = window.unsqueeze(-1) + in_block  # [B, Hs, C, W, bs], all < tk
                ok = (idx.unsqueeze(-1) >= 0) & (pos >= first.unsqueeze(-1))
                rows_at = (row_base.squeeze(-1) + window).flatten()
                kg = kwin.index_select(0, rows_at).view(b, hs, c, width * bs, d)
                vg = vwin.index_select(0, rows_at).view(b, hs, c, width * bs, d)
                if any(reads_last[start:stop]):
                    borrowed = (pos < first.unsqueeze(-1)).view(b, hs, c, width * bs, 1)
                    kg, vg = kg.masked_fill(borrowed, 0.0), vg.masked_fill(borrowed, 0.0)
                where = rows_at
            else:
                pos = first.unsqueeze(-1) + in_block
                ok = (idx.unsqueeze(-1) >= 0) & (pos < tk)
                pos = pos.clamp(0, tk - 1)
                flat = (row_base + pos).flatten()
                kg = kwin.index_select(0, flat).view(b, hs, c, width * bs, d)
                vg = vwin.index_select(0, flat).view(b, hs, c, width * bs, d)
                where = flat
            if valid_rows is not None:
                ok &= valid_rows.index_select(0, (bi * tk + pos).flatten()).view(pos.shape)
            qc, far = qr[:, :, start:stop], None
            if reposition is not None:
                far_blocks, block, query = reposition.plan(idx, pos, row_pos[start:stop], bs, ok)
                if mwin is None and query is None:
                    # Only whole blocks move (longheads): rotate them in the one gathered copy, near ones by 0.
                    if block is not None:
                        kg = reposition.rotate(kg.view(b, hs, c, width, bs, d), block).view(kg.shape)
                else:
                    moved = kg if mwin is None else mwin.index_select(0, where).view(kg.shape)
                    if block is not None:
                        moved = reposition.rotate(moved.view(b, hs, c, width, bs, d), block).view(kg.shape)
                    q_far = qc if query is None else reposition.rotate(qc, query.view(1, 1, c, rows))
                    mask = far_blocks.expand(b, hs, c, width, bs).reshape(b, hs, c, 1, width * bs)
                    far = (q_far, moved, mask)
            # Invalid keys get a position after every query, so one comparison applies causality and validity.
            key_pos = torch.where(ok, pos, beyond).view(b, hs, c, 1, width * bs)
            o, l = attend(qc, kg, vg, key_pos, row_pos[start:stop].view(1, 1, c, rows, 1), far)
            out[:, :, start:stop] = o.to(out.dtype)
            lse[:, :, start:stop] = l
        start = stop

    out = out.view(b, hs, nqb, heads_per_sel, qbs, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hq, nqb * qbs, d)
    lse = lse.view(b, hs, nqb, heads_per_sel, qbs).permute(0, 1, 3, 2, 4).reshape(b, hq, nqb * qbs)
    return out[:, :, :tq], lse[:, :, :tq]


def attend_plain(
    q: Tensor, k: Tensor, v: Tensor, key_pos: Tensor, row_pos: Tensor, far: Far | None = None
) -> tuple[Tensor, Tensor]:
    """Masked softmax attention of gathered keys, step by step in float32.

    Args:
        q: ``[..., rows, D]`` float32, already scaled; k, v: ``[..., keys, D]``.
        key_pos: ``[..., 1, keys]`` key positions (invalid keys beyond every row); row_pos: ``[..., rows, 1]``.
        far: ``(q_far [..., rows, D], k_far [..., keys, D], mask [..., 1, keys] bool)``: keys in ``mask`` are
            scored as ``q_far . k_far`` (a position policy moved them); None: ``q . k`` everywhere.

    Returns:
        ``out [..., rows, D]`` float32 and ``lse [..., rows]``; rows without a key give 0 and ``-inf``.
    """
    scores = torch.matmul(q, k.float().transpose(-1, -2))
    if far is not None:
        q_far, k_far, mask = far
        scores = torch.where(mask, torch.matmul(q_far, k_far.float().transpose(-1, -2)), scores)
    scores.masked_fill_(key_pos > row_pos, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    # Shifting empty rows by 0 keeps them at exp(-inf) = 0 instead of NaN.
    p = scores.sub_(torch.where(torch.isfinite(m), m, torch.zeros_like(m))).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v.float()).div_(denom.clamp(min=torch.finfo(torch.float32).tiny))
    return out, (m + denom.log()).squeeze(-1)
