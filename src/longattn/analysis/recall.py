"""Attention recall: the share of dense softmax mass that a method's Selection covers.

Recall is measured on sampled query rows only, so the work is ``[n, Tk]`` per head, never ``[Tq, Tk]``: a
16k-token prompt with 32 sampled queries costs 32 x 16k scores per head, about what one decode step costs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from longattn.core.selection import Selection
from longattn.ops.sampled import sample_positions, sampled_attention

# Scores of one chunk of sampled queries are [B, Hq, n, Tk]; bounding n keeps a 128k-token prompt in ~100 MB.
_CHUNK_ELEMENTS = 1 << 24


def attention_recall(
    q: Tensor,
    k: Tensor,
    selection: Selection,
    scale: float,
    positions: Tensor,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Share of each sampled query's dense causal softmax mass that falls on keys its Selection computes.

    Args:
        q: ``[B, Hq, Tq, D]`` post-RoPE queries; query row ``i`` sits at absolute position ``Tk - Tq + i``.
        k: ``[B, Hkv, Tk, D]`` post-RoPE keys (``Hq`` a multiple of ``Hkv``).
        selection: the method's Selection for these queries, ``[B, Hq or Hkv, Qblk, S]``.
        scale: softmax scale.
        positions: ``[n]`` int64 query rows to measure (see :func:`sample_positions`).
        key_mask: optional ``[B, Tk]`` bool, False for padding keys (excluded from both masses).

    Returns:
        ``[B, Hq, n]`` float32 in ``[0, 1]``: 1.0 means the selection loses nothing for that query.
    """
    b, hq, tq, d = q.shape
    _, hkv, tk, _ = k.shape
    if k.shape[0] != b or k.shape[-1] != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not fit [B, Hq, Tq, D] / [B, Hkv, Tk, D]")
    if positions.dim() != 1 or (positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= tq)):
        raise ValueError(f"positions must be a 1-D tensor of query rows in [0, {tq})")
    selection.validate(tq, tk, hq, hkv, b, q.device)
    group = hq // hkv
    nblk = -(-tk // selection.kv_block_size)
    block_of_key = torch.arange(tk, device=q.device) // selection.kv_block_size  # [Tk]
    step = max(1, _CHUNK_ELEMENTS // max(1, b * hq * tk))
    out = []
    for first in range(0, positions.numel(), step):
        rows = positions[first : first + step]
        probs = sampled_attention(q, k, scale, rows, key_mask)  # [B, Hq, n, Tk]
        # Only the sampled rows' query blocks become masks: the whole [Qblk, Nblk] mask grows as T^2.
        qb = rows // selection.query_block_size
        picked = Selection(selection.indices[:, :, qb], selection.counts[:, :, qb], 1, selection.kv_block_size)
        blocks = picked.to_mask(nblk)  # [B, H, n, Nblk]
        if blocks.shape[1] != hq:
            blocks = blocks.repeat_interleave(group, dim=1)
        covered = blocks[..., block_of_key]  # [B, Hq, n, Tk]
        out.append((probs * covered).sum(-1))
    return torch.cat(out, dim=-1).clamp(max=1.0)


@dataclass
class RecallRecorder:
    """Observer for :func:`longattn.apply`: measures attention recall at every layer of each prefill.

    Pass it as ``apply(model, method, observer=recorder)``; after the forward pass, :meth:`summary` gives the
    mean and 10th percentile per layer over heads x sampled queries. Decode steps (one query) are skipped.

    Attributes:
        num_queries: query rows sampled per prefill (see :func:`sample_positions`).
        values: per layer, the ``[B, Hq, n]`` recall tensors measured so far.
        seconds: wall time spent measuring, so that a benchmark can take it out of the prefill time it reports.
    """

    num_queries: int = 32
    values: dict[int, list[Tensor]] = field(default_factory=dict)
    seconds: float = 0.0

    def __call__(self, layer: int, q: Tensor, k: Tensor, selection: Selection, scale: float,
                 key_mask: Tensor | None) -> None:
        """Record one layer's recall. ``q [B, Hq, Tq, D]``, ``k [B, Hkv, Tk, D]``."""
        if q.shape[2] == 1:
            return
        start = time.perf_counter()
        rows = sample_positions(q.shape[2], self.num_queries, q.device)
        recall = attention_recall(q.detach(), k.detach(), selection, scale, rows, key_mask)
        self.values.setdefault(layer, []).append(recall.cpu())
        self.seconds += time.perf_counter() - start

    def reset(self) -> None:
        self.values.clear()
        self.seconds = 0.0

    def per_layer(self) -> tuple[list[float], list[float]]:
        """Mean and 10th percentile of recall for each recorded layer, in layer order."""
        means, p10s = [], []
        for layer in sorted(self.values):
            flat = torch.cat([v.flatten() for v in self.values[layer]])
            means.append(float(flat.mean()))
            p10s.append(float(torch.quantile(flat, 0.1)))
        return means, p10s

    def summary(self) -> dict[str, float | list[float]] | None:
        """``{"mean", "p10", "per_layer_mean", "per_layer_p10"}`` over everything recorded, or None if nothing was."""
        if not self.values:
            return None
        flat = torch.cat([v.flatten() for vs in self.values.values() for v in vs])
        means, p10s = self.per_layer()
        return {"mean": float(flat.mean()), "p10": float(torch.quantile(flat, 0.1)),
                "per_layer_mean": means, "per_layer_p10": p10s}
