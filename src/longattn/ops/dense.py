"""Dense causal attention through SDPA: the baseline every speed-up is measured against.

Its reference is the block-sparse operator with every causal block selected (tests compare the two); that
operator also runs a Selection's ``dense_heads`` through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.ops.merge import merge_attention


def _masked_sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float | None) -> Tensor:
    """SDPA under a bool mask ``allowed`` (broadcast to ``[B, Hq, Tq, Tk]``); rows with no allowed key are 0:
    SDPA leaves fully masked rows (padding queries) undefined, the sparse operator makes them 0."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))


_SDPA_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _sdpa_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> tuple[Tensor, Tensor]:
    """PyTorch's fused CPU attention with its log-sum-exp: ``q, k, v [B, H, T, D]`` (equal heads) ->
    ``(out [B, H, Tq, D], lse [B, H, Tq] float32)``."""
    out, lse = _SDPA_LSE(q, k, v, 0.0, causal, scale=scale)[:2]
    return out, lse


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Causal attention of a prefill chunk: ``q [B, Hq, Tq, D]`` the newest ``Tq`` of ``k, v [B, Hkv, Tk, D]``.

    Two fused passes merged by their log-sum-exp, so that no ``[Tq, Tk]`` mask is built (at a 4k chunk over a
    128k cache that mask alone is 512 MiB): every query sees every earlier key, so the keys before the chunk
    are one unmasked pass with the group's queries stacked as rows (no copy of the cache per query head), and
    the chunk's own keys one causal square pass. Its reference is :func:`dense_attention`'s masked path
    (tests). CPU (PyTorch's fused CPU kernel returns the log-sum-exp). Returns ``[B, Hq, Tq, D]``.
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g, past = hq // hkv, tk - tq
    scale = d ** -0.5 if scale is None else scale
    rows = q.reshape(b, hkv, g * tq, d)  # a GQA group's queries as rows of its KV head
    before, lse_before = _sdpa_lse(rows, k[:, :, :past], v[:, :, :past], False, scale)
    own_k = k[:, :, past:].repeat_interleave(g, dim=1)
    own_v = v[:, :, past:].repeat_interleave(g, dim=1)
    own, lse_own = _sdpa_lse(q, own_k, own_v, True, scale)
    out, _ = merge_attention(before.reshape(b, hq, tq, d), lse_before.reshape(b, hq, tq), own, lse_own)
    return out


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
    if key_mask is None and offset == tk - tq and q.device.type == "cpu" and _SDPA_LSE is not None:
        return chunk_attention(q, k, v, scale)
    # Chunked prefill or padding: an explicit [B, 1, Tq, Tk] mask, as transformers' sdpa path builds.
    allowed = torch.arange(tk, device=q.device).view(1, -1) <= (offset + torch.arange(tq, device=q.device)).view(-1, 1)
    allowed = allowed.view(1, 1, tq, tk)
    if key_mask is not None:
        allowed = allowed & key_mask.view(-1, 1, 1, tk)
    return _masked_sdpa(q, k, v, allowed, scale)


def _band(rows: Tensor, keys: Tensor, window: int) -> Tensor:
    """``[R, K]`` bool: key position ``keys[j]`` is visible to query position ``rows[i]`` in a causal window of
    ``window`` tokens (``0 <= rows[i] - keys[j] < window``, transformers' sliding-window mask)."""
    dist = rows.view(-1, 1) - keys.view(1, -1)
    return (dist >= 0) & (dist < window)


def sliding_window_attention_naive(
    q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None = None, key_mask: Tensor | None = None,
    q_offset: int | None = None,
) -> Tensor:
    """The definition of :func:`sliding_window_attention`: one ``[B, 1, Tq, Tk]`` banded mask over every key
    (tests only: its memory is ``Tq x Tk``)."""
    tq, tk = q.shape[2], k.shape[2]
    offset = tk - tq if q_offset is None else q_offset
    allowed = _band(offset + torch.arange(tq, device=q.device), torch.arange(tk, device=q.device), window)
    allowed = allowed.view(1, 1, tq, tk)
    if key_mask is not None:
        allowed = allowed & key_mask.view(-1, 1, 1, tk)
    return _masked_sdpa(q, k, v, allowed, scale)


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None = None, key_mask: Tensor | None = None,
    q_offset: int | None = None, chunk: int = 512,
) -> Tensor:
    """Causal sliding-window attention (each query sees the ``window`` newest keys up to itself), at window
    cost: query chunks of ``chunk`` rows attend through SDPA to the ``window + chunk`` keys they can see,
    so time and memory grow with ``Tq * window``, not ``Tq * Tk``.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` with ``Hq = G * Hkv``.
        window: keys per query, the model's ``sliding_window`` (``>= 1``).
        key_mask: ``[B, Tk]`` bool, False on padding keys.
        q_offset: position of query row 0 among the keys; default ``Tk - Tq``.

    Returns:
        ``[B, Hq, Tq, D]``; rows with no visible key are 0 (as :func:`dense_attention`).
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    tq, tk = q.shape[2], k.shape[2]
    offset = tk - tq if q_offset is None else q_offset
    if offset + tq <= window:  # every query sees every earlier key: plain causal attention
        return dense_attention(q, k, v, scale, key_mask, offset)
    outs = []
    for first in range(0, tq, chunk):
        last = min(tq, first + chunk)
        lo, hi = max(0, offset + first - window + 1), min(tk, offset + last)
        rows = offset + torch.arange(first, last, device=q.device)
        allowed = _band(rows, torch.arange(lo, hi, device=q.device), window).view(1, 1, last - first, hi - lo)
        if key_mask is not None:
            allowed = allowed & key_mask[:, lo:hi].view(-1, 1, 1, hi - lo)
        outs.append(_masked_sdpa(q[:, :, first:last], k[:, :, lo:hi], v[:, :, lo:hi], allowed, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
