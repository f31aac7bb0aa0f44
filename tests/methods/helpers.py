"""Running a method's selection on bare tensors, as the session does inside a model."""

from __future__ import annotations

import torch

from longattn.core.index import BlockIndex
from longattn.core.selection import Selection
from longattn.methods import Method, SelectionContext


def select(method: Method, q: torch.Tensor, k: torch.Tensor) -> Selection:
    """``q [B, Hq, Tq, D]`` (the newest Tq positions), ``k [B, Hkv, Tk, D]`` -> the method's Selection."""
    tq, tk = q.shape[2], k.shape[2]
    index = BlockIndex(method.block_size, method.summariser()) if method.summariser() is not None else None
    ctx = SelectionContext(kv_len=tk, q_offset=tk - tq, layer=0, num_kv_heads=k.shape[1], keys=k)
    return method.select(q, index.update(k, 0, q=q) if index else None, ctx)


def token_mask(selection: Selection, kv_len: int) -> torch.Tensor:
    """Keys each query block may read: ``[B, H, Qblk, Tk]`` bool (before the causal cut inside a block)."""
    bs = selection.kv_block_size
    return selection.to_mask(-(-kv_len // bs)).repeat_interleave(bs, dim=-1)[..., :kv_len]
