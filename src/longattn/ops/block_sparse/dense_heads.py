"""The heads a Selection marks dense (``Selection.dense_heads``) through SDPA, the others through a backend.

A head that attends every causal key costs more through a block-sparse backend than through fused dense SDPA;
the flag lets the operator send it there. The sparse backend gets the whole ``q``/``k``/``v`` with the dense
heads' rows emptied (count 0) instead of copies of the other heads: slicing K/V by head would copy every
sparse head's cache, which in decode costs more than the sparse attention itself, and with one selection per
query head would break the GQA head mapping. An empty row is skipped by the triton and flex kernels and costs
the gather backends at most its chunk's width.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from longattn.core.selection import Selection
from longattn.ops.dense import dense_attention


def attention_with_dense_heads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    scale: float | None,
    key_mask: Tensor | None,
    offset: int,
    sparse: Callable[..., tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """Causal attention with ``selection.dense_heads`` through :func:`~longattn.ops.dense.dense_attention`.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]``; selection ``[B, H, Qblk, S]`` (validated) with
            ``dense_heads`` set; offset: the position of query row 0.
        sparse: the resolved backend's operator, for the other heads.

    Returns:
        ``out [B, Hq, Tq, D]`` in q's dtype, ``lse [B, Hq, Tq]`` float32: NaN on the dense heads' query heads
        (SDPA returns none), the backend's elsewhere.
    """
    assert selection.dense_heads is not None
    hq, hkv, hs = q.shape[1], k.shape[1], selection.num_heads
    group = hq // hkv
    flags = selection.dense_heads  # host-side: which heads go where decides the launches, without a sync
    ids = [h for h, f in enumerate(flags) if f]
    plain = selection.without_dense_heads()
    if not ids:
        return sparse(q, k, v, plain, scale, causal=True, key_mask=key_mask, q_offset=offset)

    if len(ids) == hs:  # every head dense: one SDPA call, no backend
        out = dense_attention(q, k, v, scale, key_mask, offset)
        return out, torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device=q.device)

    if hs == hkv:  # one selection per KV head: its whole GQA group of query heads is dense
        q_heads = [h * group + i for h in ids for i in range(group)]
        kv_heads = ids
    else:  # one selection per query head: each dense query head with its own KV head (gathered per head)
        q_heads = ids
        kv_heads = [h // group for h in ids]
    qi = torch.tensor(q_heads, device=q.device)
    ki = torch.tensor(kv_heads, device=q.device)
    dense_out = dense_attention(q[:, qi], k[:, ki], v[:, ki], scale, key_mask, offset)

    keep = torch.tensor([not f for f in flags], device=q.device)
    emptied = Selection(
        torch.where(keep.view(1, -1, 1, 1), plain.indices, torch.full_like(plain.indices, -1)),
        torch.where(keep.view(1, -1, 1), plain.counts, torch.zeros_like(plain.counts)),
        plain.query_block_size,
        plain.kv_block_size,
    )
    out, lse = sparse(q, k, v, emptied, scale, causal=True, key_mask=key_mask, q_offset=offset)
    out[:, qi] = dense_out.to(out.dtype)
    lse[:, qi] = float("nan")
    return out, lse
