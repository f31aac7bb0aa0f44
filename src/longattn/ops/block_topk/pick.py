"""Blocks picked from their scores on the PyTorch path: a fixed budget (``top_blocks``) or the fewest blocks
that reach an estimated share of the softmax mass (``top_p_blocks``, an adaptive budget)."""

from __future__ import annotations

import torch
from torch import Tensor


def top_blocks(scores: Tensor, eligible: Tensor, k: int) -> Tensor:
    """The ``k`` highest-scoring eligible blocks of each row (fewer where fewer are eligible).

    Args:
        scores: ``[B, H, Qblk, Nblk]`` float; higher is better.
        eligible: bool, broadcastable to ``scores``.

    Returns:
        ``[B, H, Qblk, Nblk]`` bool.
    """
    # A non-finite score (NaN, 0 * inf in a bound) is never picked and must not take a slot from a real one.
    scores = scores.masked_fill(~eligible | ~torch.isfinite(scores), float("-inf"))
    picked = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    k = min(k, scores.shape[-1])
    if k > 0:
        top = scores.topk(k, dim=-1)
        picked = picked.scatter(-1, top.indices, torch.isfinite(top.values))
    return picked


def top_p_blocks(logits: Tensor, static: Tensor, eligible: Tensor, p: float, cap: int) -> Tensor:
    """The fewest eligible blocks of each row, best first, that bring the estimated softmax mass to ``p``.

    The mass of a block is ``softmax(logits)`` over the row's static and eligible blocks; the static blocks
    (sinks, window) count first, as they are always kept. ``p >= 1`` keeps every eligible block up to ``cap``.

    Args:
        logits: ``[B, H, Qblk, Nblk]`` float, estimated log-mass of each block (any offset per row).
        static, eligible: bool masks broadcastable to ``logits``.
        cap: the most blocks a row picks.

    Returns:
        ``[B, H, Qblk, Nblk]`` bool, the picked eligible blocks.
    """
    eligible = eligible & torch.isfinite(logits)
    if p >= 1.0:
        return top_blocks(logits, eligible, cap)
    seen = (static | eligible).expand_as(logits)
    probs = torch.softmax(logits.masked_fill(~seen, float("-inf")), dim=-1).nan_to_num(0.0)
    static_mass = (probs * static).sum(-1, keepdim=True)
    # Ineligible blocks sort last (-1) and are never picked.
    ordered = probs.masked_fill(~eligible, -1.0).sort(dim=-1, descending=True)
    mass = ordered.values.clamp(min=0.0)
    before = static_mass + mass.cumsum(-1) - mass  # the mass of the blocks ranked above
    rank = torch.arange(logits.shape[-1], device=logits.device)
    keep = (before < p) & (ordered.values >= 0) & (rank < cap)
    return torch.zeros_like(keep).scatter(-1, ordered.indices, keep)
