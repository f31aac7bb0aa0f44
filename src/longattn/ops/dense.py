"""Dense causal attention through SDPA: the baseline every speed-up is measured against.

Its reference is the block-sparse operator with every causal block selected (tests compare the two); that
operator also runs a Selection's ``dense_heads`` through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, key_mask: Tensor | None = None,
    q_offset: int | None = None,
) -> Tensor:
    """Causal attention of ``Tq`` queries over all ``Tk`` keys.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` with ``Hq = G * Hkv``.
        key_mask: ``[B, Tk]`` bool, False on padding keys.
        q_offset: position of query row 0; default ``Tk - Tq`` (the queries are the newest positions).

    Returns:
        ``[B, Hq, Tq, D]``; rows with no visible key are 0.
    """
    tq, tk = q.shape[2], k.shape[2]
    offset = tk - tq if q_offset is None else q_offset
    if key_mask is None and offset == tk - tq and tq in (1, tk):
        # The two shapes SDPA's own flags express: decode (no mask) and prefill from an empty cache.
        return F.scaled_dot_product_attention(q, k, v, is_causal=tq > 1, scale=scale, enable_gqa=True)
    # Chunked prefill or padding: an explicit [B, 1, Tq, Tk] mask, as transformers' sdpa path builds.
    allowed = torch.arange(tk, device=q.device).view(1, -1) <= (offset + torch.arange(tq, device=q.device)).view(-1, 1)
    allowed = allowed.view(1, 1, tq, tk)
    if key_mask is not None:
        allowed = allowed & key_mask.view(-1, 1, 1, tk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
    # SDPA leaves fully masked rows (padding queries) undefined; make them 0 like the sparse operator.
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))
