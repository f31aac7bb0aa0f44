"""SplitKV: one layer's keys and values as a head-aware cache holds them, for one attention call.

A method that declares which KV heads only ever read the attention sinks and the local window
(:meth:`longattn.methods.base.Method.streaming_kv_heads`) lets the cache drop the rest of those heads' keys.
What such a cache hands the attention call is then not one ``[B, Hkv, Tk, D]`` tensor but two groups:

- the **full** KV heads: every key, ``[B, Hf, Tk, D]`` at their real positions;
- the **streaming** KV heads: a compact ``[B, Hs, Tc, D]`` holding positions ``[0, sink_len)`` (the sink
  blocks) followed by positions ``[sink_len + gap, Tk)`` (the window and this step's keys). ``sink_len`` and
  ``gap`` are whole key blocks, so key block ``n`` of the sequence is compact block ``n`` before the gap and
  ``n - gap / block_size`` after it; no block a streaming head reads lies in the gap.

Razor's compensation token needs what the gap held: ``dropped`` carries the sums of the dropped keys and
values and how many valid keys they were. Everything is positional (keys are post-RoPE), so a compact
streaming head computes exactly what it computes over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from longattn.core.selection import Selection


@dataclass(frozen=True)
class SplitKV:
    """One layer's cache for one attention call, split into full and streaming KV heads.

    Attributes:
        kv_len: keys of the sequence after this step (``Tk``, the logical length).
        num_kv_heads: ``Hkv`` of the layer.
        block_size, sink_tokens, window: the static pattern the streaming heads keep (the method's): key blocks
            of ``block_size``, sinks over the first ``sink_tokens`` valid keys, a ``window``-token window.
        full_heads: the KV head ids (ascending) that keep every key; full_keys, full_values ``[B, Hf, Tk, D]``.
        stream_heads: the KV head ids (ascending) that keep sinks + window; stream_keys, stream_values
            ``[B, Hs, Tc, D]`` with ``Tc = Tk - gap``.
        sink_len: positions ``[0, sink_len)`` kept at the front of the streaming heads (whole blocks).
        gap: positions ``[sink_len, sink_len + gap)`` the streaming heads dropped (whole blocks).
        dropped: ``(key_sums, value_sums [B, Hs, D] float32, counts [B] float32)`` of the valid dropped keys,
            where the cache keeps them (for razor's compensation), else None.
        release: called by the session after the layer's attention with the step's ``[B, Tk]`` key mask (or
            None): the cache may then drop what no later query of the method reads.
    """

    kv_len: int
    num_kv_heads: int
    block_size: int
    sink_tokens: int
    window: int
    full_heads: tuple[int, ...]
    full_keys: Tensor | None
    full_values: Tensor | None
    stream_heads: tuple[int, ...]
    stream_keys: Tensor | None
    stream_values: Tensor | None
    sink_len: int = 0
    gap: int = 0
    dropped: tuple[Tensor, Tensor, Tensor] | None = None
    release: Callable[[Tensor | None], None] | None = None

    def __post_init__(self) -> None:
        if sorted(self.full_heads + self.stream_heads) != list(range(self.num_kv_heads)):
            raise ValueError(f"full_heads {self.full_heads} and stream_heads {self.stream_heads} must split the "
                             f"{self.num_kv_heads} KV heads")
        if self.sink_len % self.block_size or self.gap % self.block_size:
            raise ValueError(f"sink_len={self.sink_len} and gap={self.gap} must be whole blocks of "
                             f"{self.block_size} keys")
        for name, keys, heads, length in (("full", self.full_keys, self.full_heads, self.kv_len),
                                          ("stream", self.stream_keys, self.stream_heads, self.kv_len - self.gap)):
            if heads and (keys is None or keys.dim() != 4 or keys.shape[1] != len(heads) or keys.shape[2] != length):
                got = None if keys is None else tuple(keys.shape)
                raise ValueError(f"{name}_keys must be [B, {len(heads)}, {length}, D], got {got}")

    @property
    def _some(self) -> Tensor:
        return self.full_keys if self.full_heads else self.stream_keys

    @property
    def shape(self) -> torch.Size:
        """``(B, Hkv, Tk, D)``: the shape of the layer's keys as a full cache would hold them."""
        b, _, _, d = self._some.shape
        return torch.Size((b, self.num_kv_heads, self.kv_len, d))

    @property
    def dtype(self) -> torch.dtype:
        return self._some.dtype

    @property
    def device(self) -> torch.device:
        return self._some.device

    @property
    def stream_len(self) -> int:
        """``Tc``: positions the streaming heads hold."""
        return self.kv_len - self.gap

    def stream_key_mask(self, key_mask: Tensor | None) -> Tensor | None:
        """The ``[B, Tk]`` key mask restricted to the positions the streaming heads hold: ``[B, Tc]`` (or None)."""
        if key_mask is None or self.gap == 0:
            return key_mask
        return torch.cat((key_mask[:, : self.sink_len], key_mask[:, self.sink_len + self.gap :]), dim=1)

    def stream_selection(self, selection: Selection) -> Selection:
        """``selection`` (over the sequence's key blocks) in the streaming heads' compact block ids.

        Raises:
            RuntimeError: a selected block lies in the gap (the method read a key it declared it would not).
        """
        if self.gap == 0:
            return selection
        first, shift = self.sink_len // self.block_size, self.gap // self.block_size
        ids = selection.indices
        if bool(((ids >= first) & (ids < first + shift)).any()):
            raise RuntimeError(
                f"a streaming KV head selected a key block in [{first}, {first + shift}), which the head-aware "
                "cache dropped: the method read keys outside the sinks and window it declared "
                "(Method.streaming_kv_heads)"
            )
        moved = torch.where(ids >= first + shift, ids - shift, ids)
        return Selection(moved, selection.counts, selection.query_block_size, selection.kv_block_size,
                         selection.dense_heads)

    def logical(self, fill: float = float("nan")) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, Hkv, Tk, D]`` as a full cache would hold them, ``fill`` where the streaming
        heads dropped them (observers; a copy of the layer, so only built when one is attached)."""
        b, h, t, d = self.shape
        some = self._some
        out = []
        for full, stream in ((self.full_keys, self.stream_keys), (self.full_values, self.stream_values)):
            x = torch.full((b, h, t, d), fill, dtype=some.dtype, device=some.device)
            if self.full_heads:
                x[:, list(self.full_heads)] = full
            if self.stream_heads:
                rows = x[:, list(self.stream_heads)]
                rows[:, :, : self.sink_len] = stream[:, :, : self.sink_len]
                rows[:, :, self.sink_len + self.gap :] = stream[:, :, self.sink_len :]
                x[:, list(self.stream_heads)] = rows
            out.append(x)
        return out[0], out[1]


@dataclass(frozen=True)
class ShardedKV:
    """One layer's keys and values on one rank of a context-parallel group, for a step after the prefill.

    The sequence's positions are split over the ranks in contiguous, block-aligned shards; this rank holds
    positions ``[start, start + keys.shape[2])``. Steps after the prefill append their tokens to the last rank,
    so only its shard grows. Every rank attends its own shard and the partial results are merged exactly
    (:func:`longattn.ops.parallel.merge_across_ranks`).

    Attributes:
        keys, values: ``[B, Hkv, n, D]`` this rank's shard, this step's keys included on the last rank.
        start: the shard's first position (a multiple of every block size in use).
        kv_len: keys of the whole sequence after this step (``Tk``).
        rank, world_size: this rank's index in the group and the group's size.
        group: the ``torch.distributed`` process group (None: the default group).
    """

    keys: Tensor
    values: Tensor
    start: int
    kv_len: int
    rank: int
    world_size: int
    group: object = None

    @property
    def shape(self) -> torch.Size:
        """``[B, Hkv, Tk, D]``: the logical shape, the whole sequence's (what a full cache would hand over)."""
        b, h, _, d = self.keys.shape
        return torch.Size((b, h, self.kv_len, d))

    @property
    def is_last(self) -> bool:
        """Whether this rank holds the sequence's end (where steps append and the selection is made)."""
        return self.rank == self.world_size - 1
