"""Exact merge of partial attention results computed over disjoint key sets."""

from __future__ import annotations

import torch
from torch import Tensor


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over key set A and key set B into attention over A ∪ B (A, B disjoint).

    Args:
        out_a, out_b: ``[B, H, T, D]`` normalised outputs of each part.
        lse_a, lse_b: ``[B, H, T]`` float32 log-sum-exp of each part's scaled scores (``-inf`` for a part
            that saw no key).

    Returns:
        ``out [B, H, T, D]`` in ``out_a``'s dtype and ``lse [B, H, T]`` float32.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:-1] != lse_a.shape:
        raise ValueError(
            f"merge_attention needs out [B, H, T, D] and lse [B, H, T] of equal shapes, got "
            f"{tuple(out_a.shape)}/{tuple(lse_a.shape)} and {tuple(out_b.shape)}/{tuple(lse_b.shape)}"
        )
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    # A row where both parts are empty keeps lse = -inf; its weights are defined as 0, not NaN.
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(lse_a.float() - safe).unsqueeze(-1)
    wb = torch.exp(lse_b.float() - safe).unsqueeze(-1)
    out = wa * out_a.float() + wb * out_b.float()
    return out.to(out_a.dtype), lse
