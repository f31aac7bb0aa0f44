"""BlockIndex: per-layer summaries of key blocks, grown incrementally with the KV cache.

A full block's summary is computed once, when the block fills; the partial last block is summarised on the
fly at every call (it changes with each decoded token) and never stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

# A summariser maps key blocks [B, Hkv, N, L, D] to representatives [B, Hkv, N, R, D] (float32).
Summariser = Callable[[Tensor], Tensor]


def mean_summary(blocks: Tensor) -> Tensor:
    """Mean key of each block (MoBA, LongHeads): ``[B, Hkv, N, L, D] -> [B, Hkv, N, 1, D]``."""
    return blocks.float().mean(dim=3, keepdim=True)


def minmax_summary(blocks: Tensor) -> Tensor:
    """Element-wise min and max of each block's keys (Quest): ``[B, Hkv, N, L, D] -> [B, Hkv, N, 2, D]``."""
    b = blocks.float()
    return torch.stack((b.amin(dim=3), b.amax(dim=3)), dim=3)


SUMMARIES: dict[str, Summariser] = {"mean": mean_summary, "minmax": minmax_summary}


@dataclass
class _LayerState:
    summaries: Tensor | None  # [B, Hkv, Nfull, R, D] float32, full blocks only; None before the first fills
    tokens: int  # keys covered by `summaries` (a multiple of block_size)
    fingerprint: Tensor  # [B, Hkv, D] the first key, to notice that the cache now holds another sequence


@dataclass
class BlockIndex:
    """Summaries of key blocks, kept per layer.

    Attributes:
        block_size: keys per block.
        summary: a name in ``SUMMARIES`` ("mean", "minmax") or a callable ``[B, Hkv, N, L, D] -> [B, Hkv, N, R, D]``.
    """

    block_size: int
    summary: str | Summariser = "mean"
    _layers: dict[int, _LayerState] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
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

    def update(self, k: Tensor, layer: int) -> Tensor:
        """Summaries of every key block of ``k``, the partial last block included.

        Args:
            k: ``[B, Hkv, Tk, D]`` all keys of this layer so far (the KV cache after this step).
            layer: layer index.

        Returns:
            ``[B, Hkv, ceil(Tk / block_size), R, D]`` float32.
        """
        if k.dim() != 4:
            raise ValueError(f"k must be [B, Hkv, Tk, D], got shape {tuple(k.shape)}")
        b, h, t, d = k.shape
        bs = self.block_size
        n_full = t // bs
        state = self._layers.get(layer)
        if state is not None and not self._extends(state, k):
            state = None
        if state is None:
            state = _LayerState(summaries=None, tokens=0, fingerprint=k[:, :, 0].detach().clone())
        done = state.tokens // bs
        if n_full > done:
            fresh = k[:, :, done * bs : n_full * bs].reshape(b, h, n_full - done, bs, d)
            new = self._fn(fresh)
            state.summaries = new if state.summaries is None else torch.cat((state.summaries, new), dim=2)
            state.tokens = n_full * bs
        self._layers[layer] = state
        if t > n_full * bs:
            tail = self._fn(k[:, :, n_full * bs :].unsqueeze(2))
            return tail if state.summaries is None else torch.cat((state.summaries, tail), dim=2)
        assert state.summaries is not None  # t >= 1 and no tail means at least one full block
        return state.summaries

    @staticmethod
    def _extends(state: _LayerState, k: Tensor) -> bool:
        # The stored summaries stay valid only if k is the same sequence, grown: same batch/heads, at least as
        # many keys, and the same first key (a new prompt in the same cache slot has a different one).
        if k.shape[0] != state.fingerprint.shape[0] or k.shape[1] != state.fingerprint.shape[1]:
            return False
        if k.shape[2] < state.tokens:
            return False
        return torch.equal(k[:, :, 0], state.fingerprint)
