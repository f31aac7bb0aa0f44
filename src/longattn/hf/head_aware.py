"""A head-aware KV cache: each KV head keeps what the method will read again.

Beyond :class:`~longattn.hf.cache.GrowingCache`, for methods that declare which KV heads read only their sinks
and window (``Method.streaming_kv_heads``: ``duo``, ``razor``, ``streaming``): those heads keep only what a later query
reads, and the layer hands the attention call a :class:`~longattn.core.kv.SplitKV` instead of two tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from longattn.core.kv import SplitKV
from longattn.hf.cache import _HEADROOM_SHARE, _MIN_HEADROOM, GrowingLayer, _append, _layout, kv_bytes
from longattn.ops.block_sparse.split import heads_view
from longattn.ops.summary_attention import masked_block_sums


class HeadAwareLayer(DynamicLayer):
    """One layer of a :class:`HeadAwareCache`: full KV heads keep every key, streaming KV heads their sinks and
    window.

    Streaming heads hold positions ``[0, sink_len)`` and ``[sink_len + gap, T)`` in one buffer ``[B, Hs,
    capacity, D]``: the attention call reads it as one contiguous view. After each attention call the session
    calls ``release(key_mask)``; once ``slack`` or more whole blocks before the window are no longer read by any
    later query, they are dropped (their sums kept when ``keep_dropped``, for razor's compensation token) and the
    rest is moved down into a buffer sized for the window: a copy of ``window + slack`` rows every ``slack``
    decode steps, and after a long prefill the buffer shrinks to the window. What a later query reads is exactly
    what the method's static pattern (:class:`~longattn.core.pattern.StepPattern`) gives it: sinks are the
    blocks up to the first valid key + ``sink_tokens`` of every row, the window starts at the block of
    ``position - window``.

    ``keys`` / ``values`` stay None: the layer's content is what :meth:`update` returns.
    """

    def __init__(self, streaming: tuple[bool, ...], block_size: int, sink_tokens: int, window: int,
                 keep_dropped: bool = False, slack: int = 256) -> None:
        super().__init__()
        if not any(streaming):
            raise ValueError("a HeadAwareLayer needs at least one streaming KV head; use GrowingLayer otherwise")
        self.streaming = tuple(bool(f) for f in streaming)
        self.full_heads = tuple(h for h, f in enumerate(self.streaming) if not f)
        self.stream_heads = tuple(h for h, f in enumerate(self.streaming) if f)
        self.block_size, self.sink_tokens, self.window = block_size, sink_tokens, window
        self.keep_dropped, self.slack = keep_dropped, slack
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._length = 0  # positions of the sequence
        self._full: tuple[Tensor, Tensor] | None = None  # [B, Hf, capacity, D]
        self._stream: tuple[Tensor, Tensor] | None = None  # [B, Hs, capacity, D]
        self._sink_len = 0  # whole blocks; fixed at the first drop
        self._gap = 0  # whole blocks dropped after the sinks
        self._dropped: tuple[Tensor, Tensor, Tensor] | None = None
        self._borrowed = False  # _stream is a view of the step's key / value states, until `release`

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[SplitKV, SplitKV]:
        """Append ``key_states, value_states [B, Hkv, n, D]``; returns the layer as a :class:`SplitKV` (twice,
        in the places of keys and values: the attention call reads both from it)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[1] != len(self.streaming):
            raise ValueError(f"the cache was built for {len(self.streaming)} KV heads, got key_states of shape "
                             f"{tuple(key_states.shape)}")
        n = key_states.shape[2]
        headroom = max(_MIN_HEADROOM, (self._length + n) // _HEADROOM_SHARE)
        if self.full_heads:
            self._full = _append(self._full, self._length, heads_view(key_states, self.full_heads),
                                 heads_view(value_states, self.full_heads), headroom)
        held = self._length - self._gap
        stream_k, stream_v = heads_view(key_states, self.stream_heads), heads_view(value_states, self.stream_heads)
        if self._stream is None:
            # First fill (a prompt): the streaming heads read the model's own key / value states during this
            # step's attention, and `release` copies out only what later queries read. Copying the whole prompt
            # into a buffer first allocated a full-length block per layer only to drop it after the call, and the
            # allocator kept that memory resident (one-pass prefill saved 0.43 of duo's 1.04 GiB, memory.md).
            self._stream, self._borrowed = (stream_k, stream_v), True
        else:
            self._stream = _append(self._stream, held, stream_k, stream_v, self.slack + self.block_size)
            self._borrowed = False
        self._length += n
        kv = self.split()
        return kv, kv

    def split(self) -> SplitKV:
        """The layer as the attention call reads it (views, no copy)."""
        t, held = self._length, self._length - self._gap
        full = (None, None) if not self.full_heads else (self._full[0][:, :, :t], self._full[1][:, :, :t])
        return SplitKV(
            kv_len=t, num_kv_heads=len(self.streaming), block_size=self.block_size, sink_tokens=self.sink_tokens,
            window=self.window,
            full_heads=self.full_heads, full_keys=full[0], full_values=full[1],
            stream_heads=self.stream_heads, stream_keys=self._stream[0][:, :, :held],
            stream_values=self._stream[1][:, :, :held], sink_len=self._sink_len if self._gap else 0, gap=self._gap,
            dropped=self._dropped, release=self.release,
        )

    def _sinks(self, key_mask: Tensor | None) -> int:
        """Positions before every row's dropped run, in whole blocks: up to the block holding each row's first
        valid key + ``sink_tokens`` (left padding moves a row's sinks; without sinks its run starts at the block
        of its first valid key), as :class:`~longattn.core.pattern.StepPattern` places them."""
        bs = self.block_size
        start = 0 if key_mask is None else int(key_mask.int().argmax(dim=1).max())
        if self.sink_tokens == 0:
            return start // bs * bs
        return -(-(start + self.sink_tokens) // bs) * bs

    def release(self, key_mask: Tensor | None) -> None:
        """Drop the streaming heads' blocks no later query reads (called after the layer's attention, with the
        step's key mask ``[B, T]`` or None), once there are at least ``slack`` such keys."""
        t, bs = self._length, self.block_size
        keep_from = max(t - self.window, 0) // bs * bs  # a later query's window starts at or after this block
        if self._gap == 0:
            self._sink_len = self._sinks(key_mask)
        first = self._sink_len + self._gap  # first position held after the sinks
        if keep_from - first < max(self.slack, 1) or keep_from <= first:
            if self._borrowed:  # nothing to drop yet: own what is held, with room for the next steps
                held = t - self._gap
                self._stream = _append(None, 0, self._stream[0][:, :, :held], self._stream[1][:, :, :held],
                                       self.slack + bs)
                self._borrowed = False
            return
        kbuf, vbuf = self._stream
        lo, hi = first - self._gap, keep_from - self._gap  # buffer rows dropped
        if self.keep_dropped:
            mask = None if key_mask is None else key_mask[:, first:keep_from]
            k_sum, counts = masked_block_sums(kbuf[:, :, lo:hi], hi - lo, mask)
            v_sum, _ = masked_block_sums(vbuf[:, :, lo:hi], hi - lo, mask)
            dropped = (k_sum[:, :, 0], v_sum[:, :, 0], counts[:, 0])
            self._dropped = dropped if self._dropped is None else tuple(
                a + b for a, b in zip(self._dropped, dropped))
        held = t - self._gap
        tail = held - hi
        b, h, _, d = kbuf.shape
        capacity = self._sink_len + tail + self.slack + 2 * bs
        new = (torch.empty(b, h, capacity, d, dtype=kbuf.dtype, device=kbuf.device),
               torch.empty(b, h, capacity, vbuf.shape[-1], dtype=vbuf.dtype, device=vbuf.device))
        for dst, src in zip(new, (kbuf, vbuf)):
            dst[:, :, : self._sink_len] = src[:, :, : self._sink_len]
            dst[:, :, self._sink_len : self._sink_len + tail] = src[:, :, hi:held]
        self._stream, self._borrowed = new, False
        self._gap = keep_from - self._sink_len

    def get_seq_length(self) -> int:
        return self._length

    def kv_bytes(self) -> tuple[int, int]:
        """``(held, allocated)`` bytes of keys and values: the rows in use, and the buffers' capacity."""
        held = allocated = 0
        for bufs, rows in ((self._full, self._length), (self._stream, self._length - self._gap)):
            if bufs is not None:
                per_row = sum(x.shape[0] * x.shape[1] * x.shape[3] * x.element_size() for x in bufs)
                held += per_row * rows
                allocated += per_row * bufs[0].shape[2]
        return held, allocated

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        length = max(self._length + tokens_to_remove, 0)
        if self._gap and max(length - self.window, 0) // self.block_size * self.block_size < self._sink_len + self._gap:
            raise ValueError(
                f"cannot crop the head-aware cache to {length} tokens: its streaming heads dropped positions "
                f"[{self._sink_len}, {self._sink_len + self._gap}) that queries after {length} would read again "
                "(crop by at most the slack the cache keeps, or use a full cache: apply(..., kv_cache='full'))"
            )
        self._length = length

    def _map_batch(self, fn: Any) -> None:
        if not self.is_initialized or self._length == 0:
            return
        held = self._length - self._gap
        if self._full is not None:
            self._full = tuple(fn(x[:, :, : self._length]) for x in self._full)
        self._stream, self._borrowed = tuple(fn(x[:, :, :held]) for x in self._stream), False
        if self._dropped is not None:
            self._dropped = tuple(fn(x) for x in self._dropped)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda x: x[indices, ...])

    def offload(self) -> None:
        raise NotImplementedError("a HeadAwareCache is not offloaded (its streaming heads are already small)")

    def prefetch(self) -> None:
        raise NotImplementedError("a HeadAwareCache is not offloaded (its streaming heads are already small)")

    def reset(self) -> None:
        self._clear()


class HeadAwareCache(Cache):
    """A KV cache where each KV head keeps what the method reads again: the ``Cache`` ``apply`` gives the model
    when the method declares streaming heads (``Method.streaming_kv_heads``; ``duo``, ``razor``, ``streaming``).

    Per layer: a :class:`HeadAwareLayer` where the layer has streaming heads, a :class:`GrowingLayer` where
    every head keeps everything, and transformers' own sliding-window layer for a model's sliding layers. Only
    meaningful inside ``longattn.apply`` (its attention call reads what the layers return)::

        with longattn.apply(model, duo) as session:
            model.generate(**inputs)                                   # apply makes the cache itself
            out = model(ids, past_key_values=session.new_cache())      # or hold it yourself
    """

    def __init__(self, layers: list[Any]) -> None:
        Cache.__init__(self, layers=layers)

    @classmethod
    def for_method(cls, method: Any, config: Any, slack: int = 256) -> "HeadAwareCache":
        """The cache for ``method`` (a :class:`~longattn.methods.base.Method`) on a model with ``config``."""
        return cls(head_aware_layers(method, config, slack))

    def kv_bytes(self) -> tuple[int, int]:
        """``(held, allocated)`` bytes of keys and values over every layer."""
        return kv_bytes(self)


def head_aware_layers(method: Any, config: Any, slack: int = 256) -> list[Any]:
    """The layers of a :class:`HeadAwareCache` for ``method`` on a model with ``config``: transformers' own
    choice (``DynamicCache(config=...)``) for sliding-window layers, a :class:`HeadAwareLayer` where the method
    declares streaming heads, a :class:`GrowingLayer` elsewhere."""
    _, hq, hkv = _layout(config)
    layers: list[Any] = []
    for i, layer in enumerate(DynamicCache(config=config).layers):
        if type(layer) is not DynamicLayer:  # sliding window (or another kind transformers chose): as is
            layers.append(layer)
            continue
        flags = method.streaming_kv_heads(i, hq, hkv)
        if flags is None or not any(flags):
            layers.append(GrowingLayer())
        else:
            layers.append(HeadAwareLayer(flags, method.block_size, method.sink_tokens, method.window,
                                         keep_dropped=bool(method.adjusts_output), slack=slack))
    return layers


def declares_streaming_heads(method: Any, config: Any) -> bool:
    """Whether ``method`` declares a streaming KV head on some layer of a model with ``config``."""
    layers, hq, hkv = _layout(config)
    return any(any(method.streaming_kv_heads(i, hq, hkv) or ()) for i in range(layers))


__all__ = ["HeadAwareCache", "HeadAwareLayer", "declares_streaming_heads", "head_aware_layers"]
