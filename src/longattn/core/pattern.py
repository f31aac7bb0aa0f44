"""The static pattern every method shares: attention sinks, the local window and the causal limit.

FlexAttention describes such a pattern as a predicate (sink OR window, AND causal). Ours is the same
predicate at block granularity, stored as **per-query-block ranges of key blocks** rather than as masks:

- sinks: blocks ``[sink_lo, sink_hi)`` of each batch row (after its left padding), the same for every query
  block;
- window: blocks ``[window_lo[j], causal_hi[j]]`` of query block ``j``;
- causal: blocks ``<= causal_hi[j]``; padding: blocks holding no valid key are never retrieved.

One :class:`StepPattern` is built per forward step and method configuration (the session caches it, so the
layers of a step share it) and read by everything that needs these limits: static masks and eligibility of
every method, the fused top-k selection, razor's compensation span and the position policies' near/far
split (through :func:`window_first_block`). Everything is ``O(Qblk + B · Nblk)``; masks are derived on demand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longattn.core.checks import check_int


def window_first_block(first: Tensor, window: int, block_size: int) -> Tensor:
    """First key block of each query block's local window: the block holding ``first - window`` (clamped at 0),
    never after the query block's own first block. ``first [Qblk]`` first query positions -> ``[Qblk]``.

    The one definition of "the window": :class:`StepPattern` and the position policies (near vs far keys) use it.
    """
    return torch.minimum((first - window).clamp(min=0) // block_size, first // block_size)


@dataclass(frozen=True)
class StepPattern:
    """Sinks, window and causal limits of one step, per query block.

    Attributes:
        block_size: keys per key block; query_block_size: queries per query block; sink_tokens, window: the
            method's sinks and window in tokens (part of the pattern's identity, see :meth:`key`).
        kv_len: keys in the cache after the step; q_offset: absolute position of query row 0; q_len: queries.
        first, last: ``[Qblk]`` int64 first and last (inclusive) query position of each query block.
        window_lo: ``[Qblk]`` first window block; causal_hi: ``[Qblk]`` last block any of its queries sees.
        sink_lo, sink_hi: ``[B or 1]`` the sink blocks ``[sink_lo, sink_hi)``, from the row's first valid key
            (empty when ``sink_tokens`` is 0).
        has_key: ``[B, Nblk]`` bool, False for blocks of padding only; None when every key is valid.
    """

    block_size: int
    query_block_size: int
    sink_tokens: int
    window: int
    kv_len: int
    q_offset: int
    q_len: int
    first: Tensor
    last: Tensor
    window_lo: Tensor
    causal_hi: Tensor
    sink_lo: Tensor
    sink_hi: Tensor
    has_key: Tensor | None

    @classmethod
    def build(
        cls, q_len: int, kv_len: int, q_offset: int, block_size: int, query_block_size: int, sink_tokens: int,
        window: int, key_mask: Tensor | None = None, device: torch.device | str = "cpu",
    ) -> "StepPattern":
        """The pattern of ``q_len`` queries from position ``q_offset`` over ``kv_len`` keys.

        Args:
            key_mask: ``[B, Tk]`` bool, False on padding keys (a left-padded row's sinks start at its first
                valid key), or None.
        """
        check_int("block_size", block_size, 1)
        check_int("query_block_size", query_block_size, 1)
        check_int("sink_tokens", sink_tokens, 0)
        check_int("window", window, 0)
        bs, nqb = block_size, -(-q_len // query_block_size)
        nkb = -(-kv_len // bs)
        first = q_offset + torch.arange(nqb, device=device) * query_block_size
        last = torch.clamp(first + query_block_size, max=q_offset + q_len) - 1
        if key_mask is None:
            start = torch.zeros(1, dtype=torch.long, device=device)
            has_key = None
        else:
            start = key_mask.int().argmax(dim=1)  # first valid key of each row
            pad = nkb * bs - kv_len
            has_key = torch.nn.functional.pad(key_mask, (0, pad)).view(key_mask.shape[0], nkb, -1).any(-1)
        sink_lo = start // bs
        sink_hi = -(-(start + sink_tokens) // bs) if sink_tokens > 0 else sink_lo
        return cls(bs, query_block_size, sink_tokens, window, kv_len, q_offset, q_len, first, last,
                   window_first_block(first, window, bs), last // bs, sink_lo, sink_hi, has_key)

    @property
    def num_q_blocks(self) -> int:
        return self.first.shape[0]

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_size)

    def rows(self, start: int, stop: int) -> "StepPattern":
        """The pattern of query blocks ``[start, stop)`` only (a chunk of a step's selection)."""
        qbs = self.query_block_size
        q_first = start * qbs
        return StepPattern(
            self.block_size, qbs, self.sink_tokens, self.window, self.kv_len, self.q_offset + q_first, min(stop * qbs, self.q_len) - q_first,
            self.first[start:stop], self.last[start:stop], self.window_lo[start:stop], self.causal_hi[start:stop],
            self.sink_lo, self.sink_hi, self.has_key,
        )

    @staticmethod
    def key_of(block_size: int, query_block_size: int, sink_tokens: int, window: int, kv_len: int, q_offset: int,
               q_len: int) -> tuple[int, ...]:
        """What identifies a pattern, before building it: the geometry of the step and of the method."""
        return (block_size, query_block_size, sink_tokens, window, kv_len, q_offset, q_len)

    def key(self) -> tuple[int, ...]:
        """This pattern's :meth:`key_of`."""
        return self.key_of(self.block_size, self.query_block_size, self.sink_tokens, self.window, self.kv_len,
                           self.q_offset, self.q_len)

    def _blocks(self) -> Tensor:
        return torch.arange(self.num_kv_blocks, device=self.first.device).view(1, 1, -1)  # [1, 1, Nblk]

    def causal_mask(self) -> Tensor:
        """Blocks holding at least one key some query of the block may see: ``[1, 1, Qblk, Nblk]`` bool."""
        return (self._blocks() <= self.causal_hi.view(1, -1, 1)).unsqueeze(0)

    def static_mask(self) -> Tensor:
        """Sinks + local window, causal: ``[B or 1, 1, Qblk, Nblk]`` bool."""
        blocks = self._blocks()
        causal = blocks <= self.causal_hi.view(1, -1, 1)  # [1, Qblk, Nblk]
        window = (blocks >= self.window_lo.view(1, -1, 1)) & causal
        sinks = (blocks >= self.sink_lo.view(-1, 1, 1)) & (blocks < self.sink_hi.view(-1, 1, 1))  # [B or 1, 1, Nblk]
        return ((sinks & causal) | window).unsqueeze(1)

    def eligible_mask(self, static: Tensor) -> Tensor:
        """Blocks a query block may retrieve: causal, not in ``static``, not all padding. ``[B or 1, 1, Qblk, Nblk]``."""
        eligible = self.causal_mask() & ~static
        if self.has_key is not None:
            eligible = eligible & self.has_key.view(self.has_key.shape[0], 1, 1, -1)
        return eligible

    def static_ids(self, batch: int) -> tuple[Tensor, Tensor]:
        """The static blocks as ids instead of a mask (for the fused selection): ``ids [B, 1, Qblk, W]`` int64
        and ``kept [B, 1, Qblk, W]`` bool (False on unused slots; a sink inside the window is kept once).

        Widths come from bounds, not from the tensors (reading those back would stall a GPU): sinks span at
        most ``ceil(S / bs) + 1`` blocks from any start, the window at most ``(qbs - 1 + window) // bs + 2``.
        """
        bs, dev, nqb = self.block_size, self.first.device, self.num_q_blocks
        ws = -(-self.sink_tokens // bs) + 1
        ww = (self.query_block_size - 1 + self.window) // bs + 2
        lo, hi = self.sink_lo.expand(batch).view(batch, 1, 1, 1), self.sink_hi.expand(batch).view(batch, 1, 1, 1)
        sinks = (lo + torch.arange(ws, device=dev)).expand(batch, 1, nqb, ws)
        win_lo, causal_hi = self.window_lo.view(1, 1, -1, 1), self.causal_hi.view(1, 1, -1, 1)
        sink_ok = (sinks < hi) & (sinks < win_lo) & (sinks <= causal_hi)
        win = win_lo + torch.arange(ww, device=dev)  # [1, 1, Qblk, Ww]
        win_ok = win <= causal_hi
        ids = torch.cat([sinks, win.expand(batch, 1, -1, -1)], dim=-1)
        return ids, torch.cat([sink_ok, win_ok.expand(batch, 1, -1, -1)], dim=-1)

    def dropped_run(self, batch: int) -> tuple[Tensor, Tensor]:
        """The blocks a sinks + window head drops, between its sinks and its window: ``[lo, hi)`` per row and
        query block, ``lo, hi [B, Qblk]`` int64 (an empty run where the sinks reach the window)."""
        hi = self.window_lo.view(1, -1).expand(batch, -1)
        lo = torch.minimum(self.sink_hi.expand(batch).view(-1, 1), hi)
        return lo, hi


def real_query_rows(key_mask: Tensor, q_len: int, q_offset: int) -> Tensor:
    """For each query row, the row whose query it selects with: itself when its own token is real, else the
    nearest real row of its batch row (the last one before it, or for left padding the first one after).

    Pad rows share query blocks with real ones, and a shared selection pools its rows' scores; what a pad
    token is must not change what the real queries retrieve. A real row's copy leaves a max over the block's
    rows unchanged. ``key_mask [B, Tk]`` bool -> ``[B, Tq]`` int64 row indices.
    """
    valid = key_mask[:, q_offset : q_offset + q_len]  # [B, Tq]
    rows = torch.arange(q_len, device=key_mask.device).expand_as(valid)
    before = torch.where(valid, rows, -1).cummax(dim=1).values
    after = torch.where(valid, rows, q_len).flip(1).cummin(dim=1).values.flip(1)
    return torch.where(before >= 0, before, torch.where(after < q_len, after, rows))
