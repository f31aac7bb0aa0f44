"""Attention over block summaries: every key block a selection left out enters once, as one token.

The token of block ``j`` has the block's mean key and mean value and enters the softmax with the score
``q · mean_k_j * scale + log(n_j)`` for its ``n_j`` valid keys, so it stands for the block as a group
(``sum_i exp(q · k_i) >= n exp(q · mean_k)`` by Jensen: the estimate never overstates the block's mass).
Landmark Attention's block tokens and RazorAttention's compensation token are special cases. The result is an
``(out, lse)`` pair that :func:`~longattn.ops.merge.merge_attention` adds exactly to the selected part.

The work is ``O(Tq x Nblk x D)`` (a sixteenth of dense attention with 16-token blocks) and the memory one chunk of
``[B, Hq, rows, Nblk]`` scores: no ``[Tq, Tk]`` matrix is built.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Scores of one chunk of query rows are [B, Hq, rows, Nblk] float32.
_CHUNK_ELEMENTS = 1 << 22


def _check(q: Tensor, k_means: Tensor, v_means: Tensor, counts: Tensor, selected: Tensor, qbs: int) -> None:
    b, hq, tq, d = q.shape
    if k_means.dim() != 4 or k_means.shape[0] != b or k_means.shape[-1] != d or hq % k_means.shape[1]:
        raise ValueError(f"k_means must be [B={b}, Hkv, Nblk, D={d}] with Hq={hq} a multiple of Hkv, "
                         f"got {tuple(k_means.shape)}")
    if v_means.shape[:3] != k_means.shape[:3]:
        raise ValueError(f"v_means must be [B, Hkv, Nblk, Dv] like k_means {tuple(k_means.shape[:3])}, "
                         f"got {tuple(v_means.shape)}")
    nkb = k_means.shape[2]
    if counts.shape != (b, nkb):
        raise ValueError(f"counts must be [B={b}, Nblk={nkb}], got {tuple(counts.shape)}")
    nqb = -(-tq // qbs)
    if selected.dtype not in (torch.int32, torch.int64) or selected.dim() != 4 or selected.shape[0] != b \
            or hq % selected.shape[1] or selected.shape[2] != nqb:
        raise ValueError(f"selected must be int block ids [B={b}, Hq or Hkv, Qblk={nqb}, S] (-1 padding), "
                         f"got {selected.dtype} {tuple(selected.shape)}")


def summary_attention(
    q: Tensor, k_means: Tensor, v_means: Tensor, counts: Tensor, selected: Tensor, qbs: int, block_size: int,
    q_offset: int, scale: float,
) -> tuple[Tensor, Tensor]:
    """Each query row attends the summary token of every key block it may see in full and that its query
    block's selection does not name (those it computes exactly).

    Args:
        q: ``[B, Hq, Tq, D]`` queries; row ``i`` sits at absolute position ``q_offset + i``.
        k_means, v_means: ``[B, Hkv, Nblk, D]`` mean key and mean value of each block's valid keys (float32).
        counts: ``[B, Nblk]`` valid keys per block (0: the block is left out).
        selected: ``[B, Hq or Hkv, Qblk, S]`` int block ids each query block computes exactly (a Selection's
            ``indices``, -1 padding), ``Qblk = ceil(Tq / qbs)``.
        qbs: queries per query block of ``selected``; block_size: keys per key block.
        scale: softmax scale of the scores.

    Returns:
        ``out [B, Hq, Tq, Dv]`` in ``q``'s dtype (0 where a row has no summary token) and ``lse [B, Hq, Tq]``
        float32 (``-inf`` there).
    """
    _check(q, k_means, v_means, counts, selected, qbs)
    b, hq, tq, d = q.shape
    hkv, nkb = k_means.shape[1], k_means.shape[2]
    g, hs = hq // hkv, selected.shape[1]
    log_n = torch.where(counts > 0, counts.float().log(), float("-inf")).view(b, 1, 1, nkb)
    # A block enters a row's softmax only when the row sees all of it: its last key is at or before the row.
    block_end = (torch.arange(nkb, device=q.device) + 1) * block_size - 1  # [Nblk]
    out = torch.zeros(b, hq, tq, v_means.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, tq), float("-inf"), dtype=torch.float32, device=q.device)
    rows_per = max(qbs, (_CHUNK_ELEMENTS // max(1, b * hq * nkb)) // qbs * qbs)
    km = k_means.float()
    for r0 in range(0, tq, rows_per):
        r1 = min(tq, r0 + rows_per)
        qc = q[:, :, r0:r1].float().view(b, hkv, g, r1 - r0, d)
        s = torch.einsum("bkgrd,bknd->bkgrn", qc, km).reshape(b, hq, r1 - r0, nkb) * scale + log_n
        pos = q_offset + torch.arange(r0, r1, device=q.device)
        visible = block_end.view(1, -1) <= pos.view(-1, 1)  # [rows, Nblk]
        # Only this chunk's query blocks become masks: a whole [Qblk, Nblk] mask grows as T^2.
        ids = selected[:, :, r0 // qbs : -(-r1 // qbs)].long()
        ex = torch.zeros(*ids.shape[:3], nkb + 1, dtype=torch.bool, device=q.device)
        ex.scatter_(-1, torch.where(ids >= 0, ids, nkb), True)
        ex = ex[..., :nkb].repeat_interleave(hq // hs, dim=1)
        rows_ex = ex[:, :, torch.arange(r0, r1, device=q.device) // qbs - r0 // qbs]  # [B, Hq, rows, Nblk]
        s = s.masked_fill(rows_ex | ~visible, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [B, Hq, rows]
        safe = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        p = torch.exp(s - safe.unsqueeze(-1)).view(b, hkv, g, r1 - r0, nkb)
        out[:, :, r0:r1] = torch.einsum("bkgrn,bknd->bkgrd", p, v_means.float()).reshape(b, hq, r1 - r0, -1)
        lse[:, :, r0:r1] = row_lse
    return out.to(q.dtype), lse


def summary_attention_naive(
    q: Tensor, k_means: Tensor, v_means: Tensor, counts: Tensor, selected: Tensor, qbs: int, block_size: int,
    q_offset: int, scale: float,
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`summary_attention` (same signature and result): one row, one head at a time."""
    _check(q, k_means, v_means, counts, selected, qbs)
    b, hq, tq, _ = q.shape
    hkv, nkb = k_means.shape[1], k_means.shape[2]
    out = torch.zeros(b, hq, tq, v_means.shape[-1], dtype=torch.float32)
    lse = torch.full((b, hq, tq), float("-inf"), dtype=torch.float32)
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            eh = h // (hq // selected.shape[1])
            for i in range(tq):
                chosen = set(selected[bi, eh, i // qbs].tolist())
                logits, values = [], []
                for j in range(nkb):
                    if counts[bi, j] <= 0 or j in chosen:
                        continue
                    if (j + 1) * block_size - 1 > q_offset + i:
                        continue
                    logits.append(float(q[bi, h, i].float() @ k_means[bi, kv, j].float()) * scale
                                  + float(torch.log(counts[bi, j].float())))
                    values.append(v_means[bi, kv, j].float())
                if logits:
                    t = torch.tensor(logits)
                    w = torch.softmax(t, 0)
                    out[bi, h, i] = (w.view(-1, 1) * torch.stack(values)).sum(0)
                    lse[bi, h, i] = torch.logsumexp(t, 0)
    return out.to(q.dtype), lse


def masked_block_sums(x: Tensor, block_size: int, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sum of each block's valid rows and how many there are.

    Args:
        x: ``[B, H, Tk, D]`` keys or values; key_mask: optional ``[B, Tk]`` bool, False on padding.

    Returns:
        ``sums [B, H, Nblk, D]`` float32 and ``counts [B, Nblk]`` float32 (whole numbers).
    """
    b, h, tk, d = x.shape
    nkb = -(-tk // block_size)
    pad = nkb * block_size - tk
    valid = torch.ones(b, tk, dtype=torch.bool, device=x.device) if key_mask is None else key_mask
    w = torch.nn.functional.pad(valid.float(), (0, pad)).view(b, 1, nkb, block_size, 1)
    sums = (torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(b, h, nkb, block_size, d) * w).sum(3)
    return sums, w.view(b, nkb, block_size).sum(-1)


def block_means(x: Tensor, block_size: int, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean of each block's valid rows and the count of them.

    Args:
        x: ``[B, H, Tk, D]`` keys or values; key_mask: optional ``[B, Tk]`` bool, False on padding.

    Returns:
        ``means [B, H, Nblk, D]`` float32 (0 for a block of padding only) and ``counts [B, Nblk]`` int64.
    """
    sums, counts = masked_block_sums(x, block_size, key_mask)
    return sums / counts.clamp(min=1).view(counts.shape[0], 1, -1, 1), counts.round().long()
