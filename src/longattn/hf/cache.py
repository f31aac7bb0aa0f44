"""A KV cache that appends in place: transformers' ``DynamicCache`` with room to grow.

Why: ``DynamicCache`` appends a decoded token with ``torch.cat``, which copies the whole layer's keys and
values every step. On the default model over an 8k prompt that copy was 29 ms of moba's 87 ms per token
(cProfile, 2 Xeon cores), more than the sparse attention and selection together, and it grows with the
context. :class:`GrowingCache` keeps each layer's keys and values in buffers with headroom and hands out views
of their filled part; a step writes only its new rows, and a buffer is reallocated (1/32 more than needed,
at least 256 tokens: a copy every 1/32 of the length, amortised) only when it is full. The headroom is
small on purpose: a buffer carved from memory the allocator reuses is resident whether written or not (a
quarter of headroom measured +420 MiB of peak RSS for dense at 32k tokens). The native operator reads these
views in place.

It is a ``DynamicCache`` (same layer API, same results); pass it as ``past_key_values``. Every layer keeps its
whole history, sliding-window layers included (still exact: the session applies each layer's window); for a
hybrid model ``DynamicCache(config=model.config)`` keeps only the window of those layers, which saves their
memory but copies them per token.

:mod:`longattn.hf.head_aware` goes further for methods that declare streaming heads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


# Tokens of headroom beyond what a reallocation needs: at least this many, or 1/32 of the length.
_MIN_HEADROOM = 256
_HEADROOM_SHARE = 32


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` / ``values`` (``[B, Hkv, T, D]``) are views of the first ``T`` rows of
    ``[B, Hkv, capacity, D]`` buffers. Anything that replaces ``keys`` / ``values`` (``crop``, beam
    reordering, batch selection, offloading) is adopted as the new content on the next update."""

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers: tuple[Tensor, Tensor] | None = None
        self._views: tuple[Tensor, Tensor] | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append ``key_states, value_states [B, Hkv, Tnew, D]``; returns the views ``[B, Hkv, T + Tnew, D]``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._views is None or self.keys is not self._views[0] or self.values is not self._views[1]:
            self._adopt()
        kbuf, vbuf = self._buffers if self._buffers is not None else (None, None)
        have = 0 if self._views is None else self._views[0].shape[-2]
        need = have + key_states.shape[-2]
        if kbuf is None or need > kbuf.shape[-2] or kbuf.shape[:2] != key_states.shape[:2]:
            kbuf, vbuf = self._grow(key_states, value_states, have, need)
        kbuf[:, :, have:need] = key_states
        vbuf[:, :, have:need] = value_states
        self.keys, self.values = kbuf[:, :, :need], vbuf[:, :, :need]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def _adopt(self) -> None:
        """Take ``keys`` / ``values`` as set from outside (or empty) as the content the next buffer starts from."""
        self._buffers = None
        keys, values = getattr(self, "keys", None), getattr(self, "values", None)
        empty = keys is None or keys.dim() != 4 or keys.shape[-2] == 0
        self._views = None if empty else (keys, values)

    def _grow(self, key_states: Tensor, value_states: Tensor, have: int, need: int) -> tuple[Tensor, Tensor]:
        capacity = need + max(_MIN_HEADROOM, need // _HEADROOM_SHARE)
        b, h, _, d = key_states.shape
        kbuf = torch.empty(b, h, capacity, d, dtype=key_states.dtype, device=key_states.device)
        vbuf = torch.empty(b, h, capacity, value_states.shape[-1], dtype=value_states.dtype, device=value_states.device)
        if self._views is not None:  # have > 0
            kbuf[:, :, :have], vbuf[:, :, :have] = self._views
        self._buffers = (kbuf, vbuf)
        return kbuf, vbuf

    def reset(self) -> None:
        self._buffers = self._views = None
        super().reset()


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` of :class:`GrowingLayer` (one per layer, created as layers first write)::

        cache = longattn.GrowingCache()
        out = model(ids, past_key_values=cache, use_cache=True)   # or model.generate(..., past_key_values=cache)
    """

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)




def _append(bufs: tuple[Tensor, Tensor] | None, have: int, keys: Tensor, values: Tensor,
            headroom: int) -> tuple[Tensor, Tensor]:
    """Write ``keys, values [B, H, n, D]`` at rows ``[have, have + n)`` of ``bufs`` (``[B, H, capacity, D]``),
    reallocating with ``headroom`` rows to spare when they do not fit; returns the buffers written."""
    need = have + keys.shape[2]
    if bufs is None or need > bufs[0].shape[2] or bufs[0].shape[:2] != keys.shape[:2]:
        b, h, _, d = keys.shape
        grown = (torch.empty(b, h, need + headroom, d, dtype=keys.dtype, device=keys.device),
                 torch.empty(b, h, need + headroom, values.shape[-1], dtype=values.dtype, device=values.device))
        if bufs is not None and have:
            grown[0][:, :, :have], grown[1][:, :, :have] = bufs[0][:, :, :have], bufs[1][:, :, :have]
        bufs = grown
    bufs[0][:, :, have:need] = keys
    bufs[1][:, :, have:need] = values
    return bufs


def kv_bytes(cache: Cache) -> tuple[int, int]:
    """``(held, allocated)`` bytes of keys and values in ``cache``, any of transformers' dynamic caches or ours:
    the rows in use, and the buffers' capacity (a GrowingLayer's headroom, a HeadAwareLayer's slack)."""
    held = allocated = 0
    for layer in cache.layers:
        if hasattr(layer, "kv_bytes"):  # a head-aware layer counts its own split buffers
            h, a = layer.kv_bytes()
        elif getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            buffers = getattr(layer, "_buffers", None) or (layer.keys, layer.values)
            h = sum(x.numel() * x.element_size() for x in (layer.keys, layer.values))
            a = sum(x.numel() * x.element_size() for x in buffers)
        else:
            h = a = 0
        held, allocated = held + h, allocated + a
    return held, allocated


def _layout(config: Any) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of a model's (text) config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hq = text.num_attention_heads
    return text.num_hidden_layers, hq, getattr(text, "num_key_value_heads", None) or hq


__all__ = ["GrowingCache", "GrowingLayer", "kv_bytes"]
