"""Collective operations of context parallelism, on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Attention over disjoint key sets merges exactly through the log-sum-exp of each part
(:func:`~longattn.ops.merge.merge_attention`). Across ranks that merge is one all-gather of each rank's ``[out, lse]``
and a log-sum-exp over the ranks on every rank.
:func:`merge_across_ranks_reference` gathers every rank's part and folds ``merge_attention`` over them in rank
order: the definition the fast path is tested against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from longattn.ops.merge import merge_attention


def _check_parts(out: Tensor, lse: Tensor) -> None:
    if out.dim() != 4 or lse.shape != out.shape[:-1]:
        raise ValueError(f"out must be [B, H, T, D] and lse [B, H, T], got {tuple(out.shape)} and {tuple(lse.shape)}")


def merge_across_ranks(out: Tensor, lse: Tensor, group: Any = None) -> tuple[Tensor, Tensor]:
    """Merge each rank's attention over its own keys into attention over every rank's keys.

    One collective: every rank's ``[out, lse]`` packed in one tensor and all-gathered, then merged on each rank by
    log-sum-exp over the ranks at once (the same arithmetic everywhere, so every rank gets the same bits). A
    decode step's parts are a few KB, where the latency of each collective, not its volume, is the cost.

    Args:
        out: ``[B, H, T, D]`` this rank's normalised output over its keys (0 where it saw none).
        lse: ``[B, H, T]`` float32 log-sum-exp of its scaled scores (``-inf`` where it saw no key).
        group: the process group (None: the default group). Every rank of it must call this with equal shapes.

    Returns:
        ``out [B, H, T, D]`` in ``out``'s dtype and ``lse [B, H, T]`` float32, the same on every rank (a row no rank
        saw a key for keeps ``out = 0``, ``lse = -inf``).
    """
    _check_parts(out, lse)
    world = dist.get_world_size(group)
    packed = torch.cat((out.float(), lse.float().unsqueeze(-1)), dim=-1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=group)
    stacked = torch.stack(parts)  # [W, B, H, T, D + 1]
    outs, lses = stacked[..., :-1], stacked[..., -1]
    top = lses.amax(dim=0)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lses - safe)  # a rank with no key: exp(-inf) = 0
    den = w.sum(dim=0)
    merged = (w.unsqueeze(-1) * outs).sum(dim=0) / den.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    total = torch.where(den > 0, safe + torch.log(den), torch.full_like(safe, float("-inf")))
    return merged.to(out.dtype), total


def merge_across_ranks_reference(out: Tensor, lse: Tensor, group: Any = None) -> tuple[Tensor, Tensor]:
    """:func:`merge_across_ranks` by definition: gather every rank's ``(out, lse)`` and fold
    :func:`~longattn.ops.merge.merge_attention` over them in rank order. Same signature and shapes."""
    _check_parts(out, lse)
    world = dist.get_world_size(group)
    outs = [torch.empty_like(out) for _ in range(world)]
    lses = [torch.empty_like(lse.float()) for _ in range(world)]
    dist.all_gather(outs, out.contiguous(), group=group)
    dist.all_gather(lses, lse.float().contiguous(), group=group)
    merged, total = outs[0], lses[0]
    for o, s in zip(outs[1:], lses[1:]):
        merged, total = merge_attention(merged, total, o, s)
    return merged, total


def all_gather_cat(x: Tensor, dim: int, group: Any = None) -> Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order; the ranks' sizes along ``dim`` may differ
    (each is padded to the largest for the collective, which needs equal shapes, and trimmed after).

    Args:
        x: this rank's tensor; its other dimensions must equal every other rank's.

    Returns:
        the concatenation, the same on every rank.
    """
    world = dist.get_world_size(group)
    size = torch.tensor([x.shape[dim]], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    longest = max(lengths)
    pad_shape = list(x.shape)
    pad_shape[dim] = longest - x.shape[dim]
    padded = torch.cat((x, x.new_zeros(pad_shape)), dim=dim) if pad_shape[dim] else x.contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths)], dim=dim)


def broadcast_from_last(x: Tensor, group: Any = None) -> Tensor:
    """``x`` of the group's last rank, on every rank (in place; ``x`` must have the same shape and dtype everywhere).
    The last rank holds the sequence's end: the step's selection and the prompt's last logits."""
    world = dist.get_world_size(group)
    dist.broadcast(x, src=dist.get_global_rank(group, world - 1) if group is not None else world - 1, group=group)
    return x


__all__ = ["all_gather_cat", "broadcast_from_last", "merge_across_ranks", "merge_across_ranks_reference"]
