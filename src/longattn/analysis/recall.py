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
from longattn.ops.sampled import block_sums, sample_positions, sampled_attention

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
    """Share of each sampled query's dense causal softmax mass that falls on keys its Selection computes
    (:func:`recall_and_oracle` without the oracle): ``[B, Hq, n]`` float32 in ``[0, 1]``."""
    return recall_and_oracle(q, k, selection, scale, positions, key_mask)[0]


def recall_and_oracle(
    q: Tensor,
    k: Tensor,
    selection: Selection,
    scale: float,
    positions: Tensor,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Share of each sampled query's dense causal softmax mass that falls on keys its Selection computes.

    Args:
        q: ``[B, Hq, Tq, D]`` post-RoPE queries; query row ``i`` sits at absolute position ``Tk - Tq + i``.
        k: ``[B, Hkv, Tk, D]`` post-RoPE keys (``Hq`` a multiple of ``Hkv``).
        selection: the method's Selection for these queries, ``[B, Hq or Hkv, Qblk, S]``.
        scale: softmax scale.
        positions: ``[n]`` int64 query rows to measure (see :func:`sample_positions`).
        key_mask: optional ``[B, Tk]`` bool, False for padding keys (excluded from both masses).

    Returns:
        ``recall [B, Hq, n]`` float32 in ``[0, 1]`` (1.0: the selection loses nothing for that query) and
        ``oracle [B, Hq, n]``: what the best key blocks would hold at the same budget (as many blocks as the
        row's selection computes, chosen by the row's own dense mass), so ``oracle - recall`` is the part of
        the loss the scoring rule adds to the budget's.
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
    out, best = [], []
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
        budget = blocks.sum(-1, keepdim=True).clamp(min=1)  # [B, Hq, n, 1] blocks the row computes
        ranked = block_sums(probs, selection.kv_block_size).sort(dim=-1, descending=True).values.cumsum(-1)
        best.append(ranked.gather(-1, (budget - 1).clamp(max=ranked.shape[-1] - 1)).squeeze(-1))
    return torch.cat(out, dim=-1).clamp(max=1.0), torch.cat(best, dim=-1).clamp(max=1.0)


def output_error(q: Tensor, k: Tensor, v: Tensor, out: Tensor, scale: float, positions: Tensor,
                 key_mask: Tensor | None = None) -> Tensor:
    """Relative error of a method's attention output against dense attention, on sampled query rows.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` post-RoPE; out: ``[B, Hq, Tq, Dv]`` the method's output
            (compensation included); positions: ``[n]`` int64 query rows.

    Returns:
        ``[B, Hq, n]`` float32: ``||out - dense|| / ||dense||`` per row and head (0: exact).
    """
    b, hq, _, _ = q.shape
    hkv = k.shape[1]
    probs = sampled_attention(q, k, scale, positions, key_mask)  # [B, Hq, n, Tk]
    dense = torch.einsum("bkgnt,bktd->bkgnd", probs.view(b, hkv, hq // hkv, -1, k.shape[2]), v.float())
    dense = dense.reshape(b, hq, -1, v.shape[-1])
    got = out[:, :, positions].float()
    return (got - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-12)


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
    oracle: dict[int, list[Tensor]] = field(default_factory=dict)
    """Per layer, the oracle's recall at the same budget (:func:`recall_and_oracle`)."""
    errors: dict[int, list[Tensor]] = field(default_factory=dict)
    """Per layer, the relative error of the output against dense (:func:`output_error`)."""
    seconds: float = 0.0

    def __call__(self, layer: int, q: Tensor, k: Tensor, selection: Selection, scale: float,
                 key_mask: Tensor | None) -> None:
        """Record one layer's recall. ``q [B, Hq, Tq, D]``, ``k [B, Hkv, Tk, D]``."""
        if q.shape[2] == 1:
            return
        start = time.perf_counter()
        rows = sample_positions(q.shape[2], self.num_queries, q.device)
        recall, oracle = recall_and_oracle(q.detach(), k.detach(), selection, scale, rows, key_mask)
        self.values.setdefault(layer, []).append(recall.cpu())
        self.oracle.setdefault(layer, []).append(oracle.cpu())
        self.seconds += time.perf_counter() - start

    def observe_output(self, layer: int, q: Tensor, k: Tensor, v: Tensor, out: Tensor, scale: float,
                       key_mask: Tensor | None) -> None:
        """Record the output error of one layer's prefill on the same sampled rows. ``out [B, Hq, Tq, D]``."""
        if q.shape[2] == 1:
            return
        start = time.perf_counter()
        rows = sample_positions(q.shape[2], self.num_queries, q.device)
        err = output_error(q.detach(), k.detach(), v.detach(), out.detach(), scale, rows, key_mask)
        self.errors.setdefault(layer, []).append(err.cpu())
        self.seconds += time.perf_counter() - start

    def reset(self) -> None:
        self.values.clear()
        self.oracle.clear()
        self.errors.clear()
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
        """``{"mean", "p10", "per_layer_mean", "per_layer_p10", "oracle_mean", "per_layer_oracle",
        "output_error_mean", "per_layer_output_error"}`` over everything recorded, or None if nothing was."""
        if not self.values:
            return None
        flat = torch.cat([v.flatten() for vs in self.values.values() for v in vs])
        means, p10s = self.per_layer()
        result: dict[str, float | list[float]] = {
            "mean": float(flat.mean()), "p10": float(torch.quantile(flat, 0.1)), "per_layer_mean": means,
            "per_layer_p10": p10s}
        for name, store in (("oracle", self.oracle), ("output_error", self.errors)):
            if store:
                per = [float(torch.cat([v.flatten() for v in store[layer]]).mean()) for layer in sorted(store)]
                result[f"{name}_mean"] = float(torch.cat([v.flatten() for vs in store.values() for v in vs]).mean())
                result[f"per_layer_{name}"] = per
        return result
