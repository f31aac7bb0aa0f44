"""Block-sparse attention over a head-aware cache (:class:`~longattn.core.kv.SplitKV`).

The full KV heads and the streaming KV heads live in different tensors, so the operator runs once per group:
the full heads over every key at their real positions, the streaming heads over their compact sinks + window
with the selection moved to compact block ids (the gap is whole blocks, and no query reads into it). Causality
and padding are positional, so each group computes exactly what it computes over the whole sequence;
:func:`split_kv_attention_reference` is that statement as code (the whole sequence rebuilt, the naive backend).
"""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.core.kv import SplitKV
from longattn.core.selection import Selection


def _query_heads(kv_heads: tuple[int, ...], group: int) -> list[int]:
    return [h * group + i for h in kv_heads for i in range(group)]


def _rows(selection: Selection, rows: list[int]) -> Selection:
    """The selection of some of its heads (``rows`` index its H axis)."""
    if rows == list(range(selection.num_heads)):
        return selection
    index = torch.tensor(rows, device=selection.indices.device)
    dense = None if selection.dense_heads is None else tuple(selection.dense_heads[r] for r in rows)
    return Selection(selection.indices.index_select(1, index), selection.counts.index_select(1, index),
                     selection.query_block_size, selection.kv_block_size, dense)


def heads_view(x: Tensor, heads: "list[int] | tuple[int, ...]") -> Tensor:
    """``x[:, heads]`` as a view where the heads are a contiguous run (no copy), else gathered."""
    heads = list(heads)
    if heads == list(range(heads[0], heads[-1] + 1)):
        return x[:, heads[0] : heads[-1] + 1]
    return x[:, heads]


def split_kv_attention(
    q: Tensor, kv: SplitKV, selection: Selection, scale: float | None = None, *, key_mask: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Attention of ``q [B, Hq, Tq, D]`` (the newest ``Tq`` positions) over a split cache.

    Args:
        kv: the layer's keys and values, full and streaming KV heads apart.
        selection: ``[B, H, Qblk, S]`` (H in {Hq, Hkv}) over the sequence's key blocks, as over a full cache.
        key_mask: ``[B, Tk]`` bool over the sequence, or None.
        backend: as :func:`~longattn.ops.block_sparse.block_sparse_attention`.

    Returns:
        ``out [B, Hq, Tq, D]``, ``lse [B, Hq, Tq]`` float32 (NaN on dense-marked heads), as the operator over
        the whole sequence.
    """
    from longattn.ops.block_sparse import block_sparse_attention

    b, hq, tq, d = q.shape
    hkv = kv.num_kv_heads
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of the cache's KV heads ({hkv})")
    group = hq // hkv
    if selection.num_heads not in (hq, hkv):
        raise ValueError(f"selection has {selection.num_heads} heads; expected {hq} (query) or {hkv} (KV)")
    out = torch.empty(b, hq, tq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    groups = (
        (kv.full_heads, kv.full_keys, kv.full_values, key_mask, False),
        (kv.stream_heads, kv.stream_keys, kv.stream_values, kv.stream_key_mask(key_mask), True),
    )
    for heads, keys, values, mask, stream in groups:
        if not heads:
            continue
        q_heads = _query_heads(heads, group)
        sub = _rows(selection, q_heads if selection.num_heads == hq else list(heads))
        if stream:
            sub = kv.stream_selection(sub)
        o, l = block_sparse_attention(
            heads_view(q, q_heads), keys, values, sub, scale, causal=True, key_mask=mask,
            q_offset=keys.shape[2] - tq, backend=backend,
        )
        out[:, q_heads] = o
        lse[:, q_heads] = l
    return out, lse


def split_kv_attention_reference(
    q: Tensor, kv: SplitKV, selection: Selection, scale: float | None = None, *, key_mask: Tensor | None = None,
    backend: str = "naive",
) -> tuple[Tensor, Tensor]:
    """:func:`split_kv_attention` by its definition: the whole sequence rebuilt (zeros where the streaming
    heads dropped keys, which no selected block reads) and the naive operator over it. Same signature."""
    from longattn.ops.block_sparse import block_sparse_attention

    k, v = kv.logical(fill=0.0)
    return block_sparse_attention(q, k, v, selection.without_dense_heads(), scale, causal=True, key_mask=key_mask,
                                  q_offset=kv.kv_len - q.shape[2], backend=backend)
