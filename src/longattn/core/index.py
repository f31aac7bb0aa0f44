"""BlockIndex: per-layer summaries of key blocks, grown incrementally with the KV cache.

A full block's summary is computed once, when the block fills; the partial last block is summarised on the
fly at every call (it changes with each decoded token) and never stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from longattn.core.checks import check_int

# A summariser maps key blocks [B, Hkv, N, L, D] to representatives [B, Hkv, N, R, D] (float32). One with a
# true `uses_queries` attribute is called as fn(blocks, queries) with the same positions' queries
# [B, Hq, N, L, D], or None where the index does not have them.
Summariser = Callable[..., Tensor]


def mean_summary(blocks: Tensor) -> Tensor:
    """Mean key of each block (MoBA, LongHeads): ``[B, Hkv, N, L, D] -> [B, Hkv, N, 1, D]``."""
    return blocks.float().mean(dim=3, keepdim=True)


def minmax_summary(blocks: Tensor) -> Tensor:
    """Element-wise min and max of each block's keys (Quest): ``[B, Hkv, N, L, D] -> [B, Hkv, N, 2, D]``."""
    b = blocks.float()
    return torch.stack((b.amin(dim=3), b.amax(dim=3)), dim=3)


def attention_pooled_summary(blocks: Tensor) -> Tensor:
    """Chunk representation pooled by the chunk's own attention.

    The chunk's mean key acts as a query over the chunk's keys; the representation is the softmax-weighted sum
    of the keys, so the few keys that dominate the chunk dominate its representation instead of being averaged
    with filler.

    Args:
        blocks: ``[B, Hkv, N, L, D]`` keys of N chunks.

    Returns:
        ``[B, Hkv, N, 1, D]`` float32.
    """
    k = blocks.float()
    mean = k.mean(dim=3, keepdim=True)  # [B, Hkv, N, 1, D]
    weights = torch.softmax((k * mean).sum(-1) * k.shape[-1] ** -0.5, dim=-1)  # [B, Hkv, N, L]
    return torch.einsum("bhnl,bhnld->bhnd", weights, k).unsqueeze(3)


SUMMARIES: dict[str, Summariser] = {
    "mean": mean_summary,
    "minmax": minmax_summary,
    "attention_pooled": attention_pooled_summary,
}


@dataclass
class _LayerState:
    summaries: Tensor | None  # [B, Hkv, Nfull, R, D] float32, full blocks only; None before the first fills
    anchors: Tensor | None  # [B, Hkv, Nfull, D] the last key of each stored block
    tokens: int  # keys covered by `summaries` (a multiple of block_size)
    seen: int  # keys in the cache at the last update
    pending_q: Tensor | None = None  # [B, Hq, seen - tokens, D] queries of the partial block (query summarisers)


@dataclass
class BlockIndex:
    """Summaries of key blocks, kept per layer.

    Attributes:
        block_size: keys per block.
        summary: a name in ``SUMMARIES`` ("mean", "minmax", "attention_pooled") or a callable
            ``[B, Hkv, N, L, D] -> [B, Hkv, N, R, D]``. A callable with ``uses_queries = True`` also receives the
            queries of the block's own positions (InfLLM's representative tokens); the index keeps the queries
            of the partial last block until it fills, so decode summarises with real queries too.
    """

    block_size: int
    summary: str | Summariser = "mean"
    _layers: dict[int, _LayerState] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1)
        if isinstance(self.summary, str):
            if self.summary not in SUMMARIES:
                raise ValueError(f"summary must be one of {sorted(SUMMARIES)} or a callable, got {self.summary!r}")
            self._fn: Summariser = SUMMARIES[self.summary]
        else:
            self._fn = self.summary

    def reset(self) -> None:
        """Forget every layer (a new sequence starts)."""
        self._layers.clear()

    def reset_layer(self, layer: int) -> None:
        """Forget one layer (its cache restarted)."""
        self._layers.pop(layer, None)

    def indexed_tokens(self, layer: int) -> int:
        """Keys of ``layer`` whose block summaries are stored."""
        state = self._layers.get(layer)
        return 0 if state is None else state.tokens

    def update(self, k: Tensor, layer: int, new_tokens: int | None = None, q: Tensor | None = None,
               start: int = 0) -> Tensor:
        """Summaries of every key block of ``k``, the partial last block included.

        Stored summaries are reused only while ``k`` provably continues the indexed sequence: the same
        batch rows in the same order, and the same last key in every stored block; with ``new_tokens``, also
        exactly ``new_tokens`` keys more than at the last update. A new prompt, a cropped or regrown cache
        or a beam-search reorder therefore re-indexes instead of reusing stale summaries.

        Args:
            k: ``[B, Hkv, Tk, D]`` all keys of this layer so far (the KV cache after this step).
            layer: layer index.
            new_tokens: keys this step appended to the cache (the query length), if known.
            q: ``[B, Hq, Tq, D]`` this step's queries (the newest ``Tq`` positions), for summarisers that use them.
            start: the position of ``k``'s first row: ``k`` holds positions ``[start, start + k.shape[2])`` only
                (a context-parallel rank's shard), and the blocks before ``start`` must already be indexed
                (``start`` a multiple of ``block_size``). Only the stored blocks from ``start`` on are checked.

        Returns:
            ``[B, Hkv, ceil((start + Tk) / block_size), R, D]`` float32.
        """
        if k.dim() != 4:
            raise ValueError(f"k must be [B, Hkv, Tk, D], got shape {tuple(k.shape)}")
        bs = self.block_size
        check_int("start", start, 0)
        if start % bs:
            raise ValueError(f"start must be a multiple of block_size={bs}, got {start}")
        b, h, local, d = k.shape
        t = start + local
        n_full = t // bs
        state = self._layers.get(layer)
        if state is not None and not self._continues(state, k, new_tokens, start):
            state = None
        if state is None:
            if start:
                raise ValueError(f"layer {layer} has no indexed blocks before start={start}: index the sequence "
                                 "from position 0 first")
            state = _LayerState(summaries=None, anchors=None, tokens=0, seen=0)
        done = state.tokens // bs
        if done * bs < start:
            raise ValueError(f"layer {layer} is indexed up to {state.tokens} keys, but k starts at {start}")
        queries = self._queries(state, q, t)  # [B, Hq, t - done * bs, D] or None
        if n_full > done:
            fresh = k[:, :, done * bs - start : n_full * bs - start].reshape(b, h, n_full - done, bs, d)
            fresh_q = None
            if queries is not None:
                fresh_q = queries[:, :, : (n_full - done) * bs].reshape(b, -1, n_full - done, bs, d)
            new = self._summarise(fresh, fresh_q)
            if new.dim() != 5 or new.shape[:3] != (b, h, n_full - done) or new.shape[4] != d:
                raise ValueError(
                    f"summary must map [B, Hkv, N, L, D] to [B, Hkv, N, R, D]; got {tuple(new.shape)} "
                    f"for input {tuple(fresh.shape)}"
                )
            anchors = fresh[:, :, :, -1].detach().clone()
            state.summaries = new if state.summaries is None else torch.cat((state.summaries, new), dim=2)
            state.anchors = anchors if state.anchors is None else torch.cat((state.anchors, anchors), dim=2)
            state.tokens = n_full * bs
        state.seen = t
        state.pending_q = None if queries is None else queries[:, :, (n_full - done) * bs :].clone()
        self._layers[layer] = state
        if t > n_full * bs:
            tail_q = None if state.pending_q is None else state.pending_q.unsqueeze(2)
            tail = self._summarise(k[:, :, n_full * bs - start :].unsqueeze(2), tail_q)
            return tail if state.summaries is None else torch.cat((state.summaries, tail), dim=2)
        assert state.summaries is not None  # t >= 1 and no tail means at least one full block
        return state.summaries

    def _summarise(self, blocks: Tensor, queries: Tensor | None) -> Tensor:
        if getattr(self._fn, "uses_queries", False):
            return self._fn(blocks, queries)
        return self._fn(blocks)

    def _queries(self, state: _LayerState, q: Tensor | None, t: int) -> Tensor | None:
        """Queries of positions ``[state.tokens, t)`` when the index holds or receives all of them, else None."""
        if q is None or not getattr(self._fn, "uses_queries", False):
            return None
        if q.dim() != 4:
            raise ValueError(f"q must be [B, Hq, Tq, D], got shape {tuple(q.shape)}")
        missing = t - state.tokens  # positions of the partial block and of this step
        have = q.shape[2] + (0 if state.pending_q is None else state.pending_q.shape[2])
        if state.pending_q is not None and have == missing:
            return torch.cat((state.pending_q, q), dim=2)
        if q.shape[2] >= missing:
            return q[:, :, q.shape[2] - missing :]
        return None  # e.g. a cache re-indexed mid-sequence: the summariser falls back to keys alone

    def _continues(self, state: _LayerState, k: Tensor, new_tokens: int | None, start: int = 0) -> bool:
        t = start + k.shape[2]
        if new_tokens is not None and t - new_tokens != state.seen:
            return False
        if t < state.tokens:
            return False
        if state.anchors is None:
            return True
        if k.shape[:2] != state.anchors.shape[:2]:
            return False
        # One key per block: O(Tk / block_size * D), far below the attention it protects.
        bs = self.block_size
        first = start // bs
        return torch.equal(k[:, :, bs - 1 : state.tokens - start : bs], state.anchors[:, :, first:])

