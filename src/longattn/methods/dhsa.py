"""DHSA: key blocks scored through content-defined, variable-length chunks with length-normalised means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

import longattn.methods.base as base
from longattn.core.checks import check_int
from longattn.methods.base import SelectionContext
from longattn.methods.topk import TopKMethod


@dataclass
class DHSA(TopKMethod):
    """Dynamic Hierarchical Sparse Attention, training-free and causal: keys are cut into variable-length chunks
    wherever adjacent ``unit``-token means stop resembling each other, and a chunk scores ``q . mean x sqrt(len)``
    (length-normalised: a long relevant chunk wins by sqrt(len), not len). Chunk scores are upsampled to units; a
    unit keeps the better of its chunk's score and its own (the finest chunk, which breaks the tie a chunk spreads
    over its blocks), a key block its best unit, and each query block the ``top_k`` best blocks beyond the sinks
    and the window. Paper: https://arxiv.org/abs/2510.24606
    """

    block_size: int = 16
    """Keys per block; small blocks select more precisely (as for MoBA)."""
    sink_tokens: int = 16
    window: int = 128
    top_k: int = 32
    """Blocks retrieved per query block (32 x 16 = 512 tokens) beyond the sinks and the window."""
    unit: int = 8
    """Tokens per segmentation unit, a power of two dividing ``block_size``: chunk boundaries fall between units.
    On the default model (4k-token prompt, top_k 32), 8 kept about 0.4 points more attention recall than 16."""
    threshold: float = 0.9
    """A chunk boundary falls before a unit whose mean key has cosine similarity below this, in [-1, 1], with the
    previous unit's (-1: never on content). Raw keys share a large common direction: on the default model 90% of
    adjacent units have cosine >= 0.77-0.89 depending on the layer, so 0.5 never cuts on content and leaves only
    ``max_chunk`` pieces."""
    max_chunk: int = 128
    """Longest chunk in tokens, a positive multiple of ``unit``: longer runs of similar keys are split, so one
    mean never blurs a whole document."""

    name: ClassVar[str] = "dhsa"
    paper: ClassVar[str] = (
        "Long-Context Modeling with Dynamic Hierarchical Sparse Attention for On-Device LLMs "
        "https://arxiv.org/abs/2510.24606"
    )
    summary: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("unit", self.unit, 1, power_of_two=True)
        if self.unit > self.block_size:
            raise ValueError(f"unit must divide block_size={self.block_size} (a power of two <= it), got {self.unit}")
        if (
            not isinstance(self.threshold, (int, float))
            or isinstance(self.threshold, bool)
            or not -1.0 <= self.threshold <= 1.0  # also rejects NaN
        ):
            raise ValueError(f"threshold must be a number in [-1, 1], got {self.threshold!r}")
        check_int("max_chunk", self.max_chunk, 1)
        if self.max_chunk % self.unit:
            raise ValueError(f"max_chunk must be a positive multiple of unit={self.unit}, got {self.max_chunk}")

    def chunks(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Segment the full units of ``keys [B, Hkv, T, D]`` into chunks.

        Both rules are local (a boundary before unit ``u`` reads units ``u-1`` and ``u``; the ``max_chunk`` split
        counts from the chunk's start), so the chunk start of a unit never depends on later keys; the end does,
        which is why scoring truncates chunks at each query block's horizon.

        Returns:
            ``(start, end)``, each ``[B, Hkv, U]`` int64 with ``U = T // unit``: unit ``u`` lies in the chunk
            of units ``[start[u], end[u])``.
        """
        b, h, t, d = keys.shape
        n = t // self.unit
        ids = torch.arange(n, device=keys.device)
        means = keys[:, :, : n * self.unit].float().view(b, h, n, self.unit, d).mean(dim=3)  # [B, Hkv, U, D]
        cos = torch.nn.functional.cosine_similarity(means[:, :, 1:], means[:, :, :-1], dim=-1)  # [B, Hkv, U-1]
        # Unit 0 always starts a chunk; [..., :n] keeps U = 0 empty.
        cut = torch.nn.functional.pad(cos < self.threshold, (1, 0), value=True)[..., :n]
        run = torch.where(cut, ids, torch.zeros_like(ids)).cummax(dim=-1).values  # start of each similar run
        span = self.max_chunk // self.unit
        start = run + (ids - run) // span * span
        # A chunk ends where the next one starts: the nearest later start, found by a reversed running minimum.
        later = torch.where(start == ids, ids, torch.full_like(ids, n)).flip(-1).cummin(dim=-1).values.flip(-1)
        end = torch.nn.functional.pad(later[:, :, 1:], (0, 1), value=n)
        return start, end

    def block_scores(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        """``q [B, Hq, Tq, D]`` -> ``[B, Hq, Qblk, Nblk]`` float32: each key block's best unit score, max over
        each query block's queries.

        Query block ``j`` may only retrieve keys before its window start ``h_j``; the chunk crossing ``h_j`` is
        truncated there (its later keys are in the window, or the future), and blocks from ``h_j`` on score -inf.
        """
        b, hq, tq, d = q.shape
        hkv, bs, unit = ctx.num_kv_heads, self.block_size, self.unit
        keys = self.raw_keys(ctx)
        nqb, nkb = -(-tq // qbs), -(-ctx.kv_len // bs)
        lo = self.pattern(tq, ctx, qbs).window_lo  # window start block: [Qblk]
        horizon = lo * bs // unit  # [Qblk] units before each query block's window; <= Tk // unit
        n = keys.shape[2] // unit
        if n == 0 or int(horizon.max()) == 0:
            return torch.full((b, hq, nqb, nkb), float("-inf"), device=q.device)
        if ctx.key_mask is not None:
            keys = keys * ctx.key_mask.view(b, 1, -1, 1)  # padding keys add nothing to a chunk's sum
        start, end = self.chunks(keys)  # [B, Hkv, U]
        # Prefix sums over units in float64: chunk sums are differences of them, exact even at long contexts.
        sums = keys[:, :, : n * unit].double().view(b, hkv, n, unit, d).sum(dim=3)
        prefix = torch.nn.functional.pad(sums.cumsum(dim=2), (0, 0, 1, 0))  # [B, Hkv, U+1, D]
        # Score each chunk once, not once per unit: number the chunks of each head (padding slots stay empty).
        chunk_of = (start == torch.arange(n, device=q.device)).cumsum(dim=2) - 1  # [B, Hkv, U]
        width = int(chunk_of[:, :, -1].max()) + 1
        first_unit = start.new_zeros(b, hkv, width).scatter_(2, chunk_of, start)
        end_unit = start.new_zeros(b, hkv, width).scatter_(2, chunk_of, end)
        whole = self._chunk_vectors(prefix, first_unit, end_unit)  # [B, Hkv, C, D]
        own = (sums / unit**0.5).float()  # [B, Hkv, U, D]: each unit alone, the finest chunk
        # The chunk holding unit h_j - 1 is the one cut at h_j: it spans [start[h_j - 1], h_j).
        hz = horizon.view(1, 1, -1).expand(b, hkv, -1)
        tail_start = start.gather(2, (hz - 1).clamp(min=0))  # [B, Hkv, Qblk]
        tail = self._chunk_vectors(prefix, tail_start, hz)  # [B, Hkv, Qblk, D]
        span = min(self.max_chunk // unit, n)  # units in a cut chunk, at most
        # Units of each cut chunk, [B, Hkv, Qblk, span]; slots past h_j - 1 repeat it (same value written twice).
        cut_units = tail_start.unsqueeze(-1) + torch.arange(span, device=q.device)
        cut_units = torch.minimum(cut_units, (hz - 1).clamp(min=0).unsqueeze(-1))

        # Rows padded to whole query blocks repeat the last query: a duplicate never changes a max. Layout
        # [B*Hkv, T, G, D], so a run of query blocks is one contiguous slice.
        grp = hq // hkv
        rows = torch.arange(nqb * qbs, device=q.device).clamp(max=tq - 1)
        g = q.float().view(b, hkv, grp, tq, d).transpose(2, 3).index_select(2, rows).view(b * hkv, -1, d)
        tail = tail.view(b * hkv, nqb, d)
        cut_units = cut_units.view(b * hkv, nqb, 1, span).expand(-1, -1, grp, -1)
        whole, own = whole.view(b * hkv, width, d), own.view(b * hkv, n, d)
        chunk_of = chunk_of.view(b * hkv, 1, 1, n)
        per_block = bs // unit
        scores = torch.zeros(b * hkv, nqb, grp, nkb * per_block, device=q.device)
        # The [rows x (C + U)] products are up to 2 * bs / unit times larger than the [rows x Nblk] that select()
        # budgets its chunks for, so score a few query blocks at a time.
        step = max(1, base._SELECT_CHUNK_ELEMENTS // (b * hq * qbs * (width + n)))
        for j0 in range(0, nqb, step):
            j = slice(j0, min(j0 + step, nqb))
            nj = j.stop - j.start
            # Only units before these query blocks' last horizon can be retrieved: causal prefill needs half the
            # products. Later columns stay 0 and are masked with their blocks below.
            nu = int(horizon[j].max())
            if nu == 0:
                continue
            nc = int(chunk_of[..., nu - 1].max()) + 1
            # The cut chunks of these query blocks ride along as nj extra columns (each block reads its own).
            cols = torch.cat((whole[:, :nc], own[:, :nu], tail[:, j]), dim=1).transpose(1, 2)  # [B*Hkv, D, N]
            # Max over each query block's queries before combining the two scales: max commutes with max.
            pooled = torch.bmm(g[:, j0 * qbs * grp : j.stop * qbs * grp], cols)
            pooled = pooled.view(b * hkv, nj, qbs, grp, -1).amax(dim=2)  # [B*Hkv, J, G, nc + nu + nj]
            chunk = pooled[..., :nc].gather(-1, chunk_of[..., :nu].expand(-1, nj, grp, -1))  # upsampled to units
            cut = pooled[..., nc + nu :].diagonal(dim1=1, dim2=3).transpose(1, 2)  # [B*Hkv, J, G]
            chunk.scatter_(-1, cut_units[:, j], cut.unsqueeze(-1).expand(-1, -1, -1, span))
            scores[:, j, :, :nu] = torch.maximum(chunk, pooled[..., nc : nc + nu])
        scores = scores.view(b, hkv, nqb, grp, nkb, per_block).amax(dim=-1).transpose(2, 3)
        # Blocks from h_j on hold the window (or the future): whole blocks, since h_j is block aligned.
        beyond = torch.arange(nkb, device=q.device) >= lo.view(-1, 1)  # [Qblk, Nblk]
        return scores.masked_fill(beyond, float("-inf")).reshape(b, hq, nqb, nkb)

    def _chunk_vectors(self, prefix: Tensor, s: Tensor, e: Tensor) -> Tensor:
        """mean x sqrt(len) = sum / sqrt(len) of the keys of units ``[s, e)`` (len in tokens).

        Args:
            prefix: ``[B, Hkv, U+1, D]`` float64 prefix sums of unit key sums.
            s, e: ``[B, Hkv, N]`` int64 first and past-the-end units.

        Returns:
            ``[B, Hkv, N, D]`` float32.
        """
        d = prefix.shape[-1]
        at_e = prefix.gather(2, e.unsqueeze(-1).expand(-1, -1, -1, d))
        at_s = prefix.gather(2, s.unsqueeze(-1).expand(-1, -1, -1, d))
        length = ((e - s) * self.unit).clamp(min=1).unsqueeze(-1)
        return ((at_e - at_s) / length.sqrt()).float()
