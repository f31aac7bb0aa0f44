"""Block-sparse attention in plain PyTorch: the reference every fast backend is tested against.

Query blocks are processed in chunks; each chunk gathers only its selected key blocks, so peak memory is
O(chunk · S · block) and no T×T matrix is ever built. It is also the CPU fast path: on 2 cores it beats
dense causal SDPA once density is low (see benchmarks/attention_op.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.core.selection import Selection

# Elements of the per-chunk score tensor; ~32 MiB in float32 keeps the working set in cache-friendly pieces
# while amortising Python overhead over many query blocks.
_CHUNK_ELEMENTS = 1 << 23


def check_inputs(
    q: Tensor, k: Tensor, v: Tensor, selection: Selection, key_mask: Tensor | None, q_offset: int | None
) -> int:
    """Validate operator inputs; returns the absolute position of the first query."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, T, D], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, tq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must be [B={b}, Hkv, Tk, D={d}], got {tuple(k.shape)}")
    hkv, tk = k.shape[1], k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    offset = tk - tq if q_offset is None else q_offset
    if offset < 0 or offset + tq > tk:
        raise ValueError(f"q_offset={offset} with q_len={tq} must fit inside kv_len={tk}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (b, tk)):
        raise ValueError(f"key_mask must be a bool tensor [B={b}, Tk={tk}], got {key_mask.dtype} {tuple(key_mask.shape)}")
    selection.validate(tq, tk, hq, hkv, b)
    return offset


def block_sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    scale: float | None = None,
    *,
    causal: bool = True,
    key_mask: Tensor | None = None,
    q_offset: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of each query block over its selected key blocks.

    Args:
        q: ``[B, Hq, Tq, D]`` queries; query row ``i`` sits at position ``q_offset + i``.
        k, v: ``[B, Hkv, Tk, D]`` keys and values (not repeated for GQA; ``Hq = G * Hkv``).
        selection: indices ``[B, H, Qblk, S]`` with ``H`` in ``{Hq, Hkv}``; when ``H == Hkv`` the group's
            query heads share one gather of K/V.
        scale: softmax scale, default ``1/sqrt(D)``.
        causal: mask keys after each query's position (inside blocks that cross the diagonal).
        key_mask: ``[B, Tk]`` bool, False for keys no query may attend (padding).
        q_offset: absolute position of query row 0; default ``Tk - Tq`` (queries are the newest keys).

    Returns:
        ``out [B, Hq, Tq, D]`` in q's dtype and ``lse [B, Hq, Tq]`` float32 (natural log). A row with no
        attendable key gets ``out = 0`` and ``lse = -inf`` so that merging stays exact.
    """
    offset = check_inputs(q, k, v, selection, key_mask, q_offset)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    hs = selection.num_heads
    bs, qbs = selection.kv_block_size, selection.q_block_size
    nqb = selection.num_q_blocks
    nkb = -(-tk // bs)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    heads_per_sel = hq // hs  # query heads that share one selection row
    sel_per_kv = hs // hkv  # selection heads per KV head

    # Pad keys to whole blocks; the padded slots are masked by position below.
    pad_k = nkb * bs - tk
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad_k)).view(b, hkv, nkb, bs, d)
    vb = torch.nn.functional.pad(v, (0, 0, 0, pad_k)).view(b, hkv, nkb, bs, d)
    valid_key = torch.ones(b, tk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    valid_key = torch.nn.functional.pad(valid_key, (0, pad_k), value=False).view(b, 1, nkb, bs)

    # Rows of one selection head: its query heads x the query block's tokens.  q: [B, Hq, Tq, D] ->
    # [B, Hs, Qblk, heads_per_sel * qbs, D]
    pad_q = nqb * qbs - tq
    qr = torch.nn.functional.pad(q, (0, 0, 0, pad_q)).view(b, hs, heads_per_sel, nqb, qbs, d)
    qr = qr.permute(0, 1, 3, 2, 4, 5).reshape(b, hs, nqb, heads_per_sel * qbs, d)
    rows = heads_per_sel * qbs
    # Position of each row: [Qblk, rows]
    row_pos = offset + (torch.arange(nqb, device=q.device) * qbs).unsqueeze(1) + (
        torch.arange(rows, device=q.device) % qbs
    ).unsqueeze(0)

    out = q.new_zeros((b, hs, nqb, rows, d))
    lse = torch.full((b, hs, nqb, rows), float("-inf"), dtype=torch.float32, device=q.device)
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    kvh = (torch.arange(hs, device=q.device) // sel_per_kv).view(1, hs, 1, 1)
    in_block = torch.arange(bs, device=q.device)

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
            _attend_chunk(
                qr, kb, vb, valid_key, selection.indices, row_pos, out, lse,
                start, stop, width, bi, kvh, in_block, scale, causal, tk,
            )
        start = stop

    out = out.view(b, hs, nqb, heads_per_sel, qbs, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hq, nqb * qbs, d)
    lse = lse.view(b, hs, nqb, heads_per_sel, qbs).permute(0, 1, 3, 2, 4).reshape(b, hq, nqb * qbs)
    return out[:, :, :tq], lse[:, :, :tq]


def _attend_chunk(
    qr: Tensor, kb: Tensor, vb: Tensor, valid_key: Tensor, indices: Tensor, row_pos: Tensor,
    out: Tensor, lse: Tensor, start: int, stop: int, width: int,
    bi: Tensor, kvh: Tensor, in_block: Tensor, scale: float, causal: bool, tk: int,
) -> None:
    """Attention for query blocks ``[start, stop)`` over their first ``width`` selected blocks, in place."""
    idx = indices[:, :, start:stop, :width].long()  # [B, Hs, C, W]
    used = idx >= 0
    idx = idx.clamp(min=0)
    b, hs, c, w = idx.shape
    bs, d = kb.shape[3], kb.shape[4]
    kg = kb[bi, kvh, idx].reshape(b, hs, c, w * bs, d)  # [B, Hs, C, W*bs, D]
    vg = vb[bi, kvh, idx].reshape(b, hs, c, w * bs, d)
    key_pos = (idx.unsqueeze(-1) * bs + in_block).reshape(b, hs, c, w * bs)
    ok = (used.unsqueeze(-1) & valid_key[bi, 0, idx]).reshape(b, hs, c, w * bs) & (key_pos < tk)
    q = qr[:, :, start:stop]  # [B, Hs, C, rows, D]
    scores = torch.matmul(q.float(), kg.float().transpose(-1, -2)).mul_(scale)  # [B, Hs, C, rows, W*bs]
    allowed = ok.unsqueeze(-2)
    if causal:
        allowed = allowed & (key_pos.unsqueeze(-2) <= row_pos[start:stop].view(1, 1, c, -1, 1))
    scores.masked_fill_(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, vg.float()) / denom.clamp(min=torch.finfo(torch.float32).tiny)
    out[:, :, start:stop] = torch.where(denom > 0, o, torch.zeros_like(o)).to(out.dtype)
    lse[:, :, start:stop] = (m + denom.log()).squeeze(-1)
