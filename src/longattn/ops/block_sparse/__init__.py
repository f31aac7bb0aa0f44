"""Block-sparse attention operator with backend dispatch."""

from __future__ import annotations

from torch import Tensor

from longattn.core.selection import Selection
from longattn.ops.block_sparse.reference import block_sparse_attention_reference

BACKENDS = ("auto", "reference")


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    scale: float | None = None,
    *,
    causal: bool = True,
    key_mask: Tensor | None = None,
    q_offset: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Attention of each query block over its selected key blocks.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]``; selection: ``[B, H, Qblk, S]`` with H in {Hq, Hkv}.
        backend: one of ``BACKENDS``; "auto" picks the fastest available for the device (today: reference).

    Returns:
        ``out [B, Hq, Tq, D]`` and ``lse [B, Hq, Tq]`` float32. See
        :func:`~longattn.ops.block_sparse.reference.block_sparse_attention_reference` for the full contract.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return block_sparse_attention_reference(
        q, k, v, selection, scale, causal=causal, key_mask=key_mask, q_offset=q_offset
    )


__all__ = ["BACKENDS", "block_sparse_attention", "block_sparse_attention_reference"]
