"""Attention over block summaries: every key block a selection left out enters once, as one token.

The token of block ``j`` has the block's mean key and mean value and enters the softmax with the score
``q · mean_k_j * scale + log(n_j)`` for its ``n_j`` valid keys, so it stands for the block as a group
(``sum_i exp(q · k_i) >= n exp(q · mean_k)`` by Jensen: the estimate never overstates the block's mass).
Landmark Attention's block tokens and RazorAttention's compensation token are special cases. The result is an
``(out, lse)`` pair that :func:`~longattn.ops.merge.merge_attention` adds exactly to the selected part.

The work is ``O(Tq x Nblk x D)`` over the blocks each chunk of query blocks can see (a 32nd of dense attention
with 16-token blocks: causal) and the memory one chunk of ``[B, Hq, rows, Nblk]`` scores: no ``[Tq, Tk]`` matrix
is built. Each chunk is two matrix products per KV head (its GQA group's rows stacked) and five passes over
its scores; the selected blocks leave the softmax by a scatter of their ids, not a mask.
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
    hkv, nkb, dv = k_means.shape[1], k_means.shape[2], v_means.shape[-1]
    g, hs = hq // hkv, selected.shape[1]
    nqb = -(-tq // qbs)
    dev = q.device
    log_n = torch.where(counts > 0, counts.float().log(), float("-inf"))  # [B, Nblk]
    # Zero rows padded to whole query blocks, the scale folded into q once.
    qf = torch.nn.functional.pad(q.float() * scale, (0, 0, 0, nqb * qbs - tq))  # [B, Hq, Qblk * qbs, D]
    out = torch.zeros(b, hq, nqb * qbs, dv, dtype=torch.float32, device=dev)
    lse = torch.full((b, hq, nqb * qbs), float("-inf"), dtype=torch.float32, device=dev)
    per = max(1, _CHUNK_ELEMENTS // max(1, b * hq * qbs * (nkb + 1)))  # query blocks per chunk
    for c0 in range(0, nqb, per):
        c1 = min(nqb, c0 + per)
        r0, r1 = c0 * qbs, c1 * qbs
        last = q_offset + min(r1, tq) - 1
        # Blocks the chunk's last real row sees in full: block j iff (j + 1) * block_size - 1 <= its position.
        lim = min(nkb, (last + 1) // block_size)
        if lim == 0:
            continue
        rows, c = r1 - r0, c1 - c0
        # One extra zero key / value column: the slot every padding id of ``selected`` points at.
        km = torch.nn.functional.pad(k_means[:, :, :lim].float(), (0, 0, 0, 1))
        vm = torch.nn.functional.pad(v_means[:, :, :lim].float(), (0, 0, 0, 1))
        qc = qf[:, :, r0:r1].reshape(b, hkv, g * rows, d)
        s = (qc @ km.transpose(-1, -2)).view(b, hq, rows, lim + 1)  # GQA group stacked: no K copy per head
        s[..., :lim] += log_n[:, None, None, :lim]
        ids = selected[:, :, c0:c1].long()
        ids = torch.where((ids >= 0) & (ids < lim), ids, lim)
        if hs != hq:
            ids = ids.repeat_interleave(hq // hs, dim=1)
        # The chunk's selected blocks (and the spare column) leave its softmax: a scatter over S ids per
        # query block, not a [rows, Nblk] mask.
        s.view(b, hq, c, qbs, lim + 1).scatter_(-1, ids.unsqueeze(3).expand(-1, -1, -1, qbs, -1), float("-inf"))
        s[..., lim] = float("-inf")
        # Near the diagonal an earlier row of the chunk sees fewer whole blocks than its last row.
        first_full = (q_offset + r0 + 1) // block_size
        if first_full < lim:
            pos = q_offset + torch.arange(r0, r1, device=dev)
            cols = torch.arange(first_full, lim, device=dev)
            hidden = (cols.view(1, -1) + 1) * block_size - 1 > pos.view(-1, 1)  # [rows, cols]
            s[..., first_full:lim].masked_fill_(hidden, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s.sub_(m).exp_()
        total = s.sum(-1)  # [B, Hq, rows]
        o = (s.view(b, hkv, g * rows, lim + 1) @ vm).view(b, hq, rows, dv)
        out[:, :, r0:r1] = o / total.clamp(min=1e-30).unsqueeze(-1)
        lse[:, :, r0:r1] = torch.where(total > 0, m.squeeze(-1) + total.log(), float("-inf"))
    return out[:, :, :tq].to(q.dtype), lse[:, :, :tq]


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
