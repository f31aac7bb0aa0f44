"""Selection: which key blocks each query block of each head attends.

The layout is FlexAttention's ``BlockMask.from_kv_blocks`` (``kv_indices``, ``kv_num_blocks``), so a
Selection converts to a BlockMask without copying logic. Sinks and the local window are ordinary selected
blocks; causality inside a block that crosses the diagonal is applied by the operator.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from longattn.core.checks import check_int


@dataclass(frozen=True)
class Selection:
    """Block-sparse attention pattern.

    Attributes:
        indices: ``[B, H, Qblk, S]`` int32 key-block indices; valid entries come first, then ``-1`` padding.
            ``H`` is the number of query heads, or of KV heads when one selection is shared by a GQA group.
        counts: ``[B, H, Qblk]`` int32 number of valid entries in each row of ``indices``.
        query_block_size: queries per query block (query block ``j`` holds query rows ``[j*query_block_size, ...)``).
        kv_block_size: keys per key block (key block ``n`` holds keys ``[n*kv_block_size, ...)``).
        dense_heads: ``H`` bools (a tuple) or None: True where a head attends every causal key. Such a head's
            rows still list every causal block (so :meth:`pairs`, :meth:`to_mask` and observers stay exact);
            the flag only lets the operator run it through dense SDPA, whose ``lse`` is NaN (see
            :func:`~longattn.ops.block_sparse.block_sparse_attention`). A promise of the method that builds
            the Selection, not checked against ``indices``. Host-side on purpose: which heads go where decides
            the launches, and a device tensor would be read back at every layer. A list or a 1-D bool tensor
            is accepted and stored as a tuple.
    """

    indices: Tensor
    counts: Tensor
    query_block_size: int
    kv_block_size: int
    dense_heads: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if self.indices.dim() != 4:
            raise ValueError(f"indices must be [B, H, Qblk, S], got shape {tuple(self.indices.shape)}")
        if self.counts.shape != self.indices.shape[:3]:
            raise ValueError(
                f"counts must be [B, H, Qblk] = {tuple(self.indices.shape[:3])}, got {tuple(self.counts.shape)}"
            )
        if self.indices.dtype != torch.int32 or self.counts.dtype != torch.int32:
            raise ValueError(
                f"indices and counts must be int32, got {self.indices.dtype} and {self.counts.dtype}"
            )
        check_int("query_block_size", self.query_block_size, 1)
        check_int("kv_block_size", self.kv_block_size, 1)
        dense = self.dense_heads
        if dense is not None:
            if isinstance(dense, Tensor) and dense.dtype == torch.bool and dense.dim() == 1:
                dense = tuple(dense.tolist())
            if not isinstance(dense, (tuple, list)) or len(dense) != self.num_heads or not all(
                isinstance(f, bool) for f in dense
            ):
                got = f"a {dense.dtype} tensor of shape {tuple(dense.shape)}" if isinstance(dense, Tensor) else repr(dense)
                raise ValueError(f"dense_heads must be H={self.num_heads} bools (a tuple, list or 1-D bool tensor, one "
                                 f"flag per selection head), got {got}")
            object.__setattr__(self, "dense_heads", tuple(dense))

    @property
    def all_dense(self) -> bool:
        """Whether every head is dense (the operator then needs no block-sparse backend)."""
        return self.dense_heads is not None and all(self.dense_heads)

    @property
    def num_heads(self) -> int:
        return self.indices.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.indices.shape[2]

    def without_dense_heads(self) -> "Selection":
        """This Selection with ``dense_heads=None``: every head through the block-sparse backend, with a finite
        ``lse`` (for a method that reads ``lse`` on every head)."""
        return self if self.dense_heads is None else replace(self, dense_heads=None)

    @classmethod
    def from_mask(
        cls, mask: Tensor, query_block_size: int, kv_block_size: int,
        dense_heads: "tuple[bool, ...] | list[bool] | Tensor | None" = None,
    ) -> "Selection":
        """Build a Selection from a block mask.

        Args:
            mask: ``[B, H, Qblk, Nblk]`` bool, True where query block attends key block.
            dense_heads: ``H`` bools, see the class attribute (rows of those heads must hold every causal block).
        """
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError(f"mask must be a [B, H, Qblk, Nblk] bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        nblk = mask.shape[-1]
        counts = mask.sum(-1, dtype=torch.int32)
        width = max(int(counts.max()) if counts.numel() else 0, 1)
        # Sorting puts selected block ids (ascending) before the sentinel nblk; the sort is over Nblk, which is
        # T / block_size, so it stays far cheaper than the attention it plans.
        ids = torch.arange(nblk, device=mask.device, dtype=torch.int32)
        keyed = torch.where(mask, ids, torch.full_like(ids, nblk))
        ordered = keyed.sort(dim=-1).values[..., :width]
        indices = torch.where(ordered < nblk, ordered, torch.full_like(ordered, -1))
        return cls(indices.contiguous(), counts, query_block_size, kv_block_size, dense_heads)

    @classmethod
    def concat(cls, parts: list["Selection"]) -> "Selection":
        """Join selections of consecutive query blocks (same heads and block sizes) along ``Qblk``."""
        if not parts:
            raise ValueError("concat needs at least one Selection")
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        if any((p.query_block_size, p.kv_block_size) != (first.query_block_size, first.kv_block_size) for p in parts):
            raise ValueError("concat needs selections with equal query_block_size and kv_block_size")
        if any(p.indices.shape[:2] != first.indices.shape[:2] for p in parts):
            raise ValueError("concat needs selections with equal batch and head dimensions [B, H]")
        dense = first.dense_heads
        if any(p.dense_heads != dense for p in parts):
            raise ValueError("concat needs selections with equal dense_heads (the same heads dense in every part)")
        width = max(p.indices.shape[-1] for p in parts)
        indices = torch.cat(
            [torch.nn.functional.pad(p.indices, (0, width - p.indices.shape[-1]), value=-1) for p in parts], dim=2
        )
        counts = torch.cat([p.counts for p in parts], dim=2)
        return cls(indices, counts, first.query_block_size, first.kv_block_size, dense)

    def to_mask(self, num_kv_blocks: int) -> Tensor:
        """Block mask ``[B, H, Qblk, num_kv_blocks]`` bool (the inverse of :meth:`from_mask`)."""
        b, h, qb, _ = self.indices.shape
        mask = torch.zeros(b, h, qb, num_kv_blocks + 1, dtype=torch.bool, device=self.indices.device)
        idx = torch.where(self.indices >= 0, self.indices, num_kv_blocks).long()
        mask.scatter_(-1, idx, True)
        return mask[..., :num_kv_blocks]

    def validate(
        self, q_len: int, kv_len: int, num_q_heads: int, num_kv_heads: int, batch: int, device: torch.device | None = None
    ) -> None:
        """Check that this Selection fits queries ``[batch, num_q_heads, q_len, D]`` and keys of length ``kv_len``."""
        b, h, qb, s = self.indices.shape
        if device is not None and self.indices.device != device:
            raise ValueError(f"selection is on {self.indices.device} but the queries are on {device}")
        if b != batch:
            raise ValueError(f"selection batch {b} does not match the query batch {batch}")
        if h not in (num_q_heads, num_kv_heads):
            raise ValueError(
                f"selection heads H={h} must equal the query heads ({num_q_heads}) or the KV heads ({num_kv_heads})"
            )
        expected_qb = -(-q_len // self.query_block_size)
        if qb != expected_qb:
            raise ValueError(
                f"selection has {qb} query blocks but q_len={q_len} with query_block_size={self.query_block_size} "
                f"needs {expected_qb}"
            )
        nblk = -(-kv_len // self.kv_block_size)
        if not self.indices.numel():
            if self.counts.numel() and bool((self.counts != 0).any()):
                raise ValueError(f"selection counts must lie in [0, S={s}]")
            return
        # Every value check is computed on the device and read back once: one sync per call, not six (this
        # runs at every attention call of every layer, and on a GPU each read-back stalls the stream).
        idx, cnt = self.indices, self.counts
        slots = torch.arange(s, device=idx.device)
        valid = slots < cnt.unsqueeze(-1)
        # A repeated block would be counted twice in the softmax.
        ordered = torch.where(valid, idx, nblk + slots.to(torch.int32)).sort(dim=-1).values
        bad = torch.stack([
            (cnt.min() < 0) | (cnt.max() > s),
            (idx.max() >= nblk) | (idx.min() < -1),
            (valid != (idx >= 0)).any(),
            (ordered[..., 1:] == ordered[..., :-1]).any(),
        ]).tolist()
        if bad[0]:
            raise ValueError(f"selection counts must lie in [0, S={s}]")
        if bad[1]:
            raise ValueError(
                f"selection indices must lie in [-1, {nblk - 1}] for kv_len={kv_len} and "
                f"kv_block_size={self.kv_block_size}"
            )
        if bad[2]:
            raise ValueError("selection indices must hold `counts` valid entries first, then -1 padding")
        if bad[3]:
            raise ValueError("selection indices must not repeat a key block within one query block")

    def pairs(self, q_len: int, kv_len: int, q_offset: int | None = None) -> Tensor:
        """Number of causal query-key pairs the selection computes, per head: ``[B, H]`` int64.

        Query row ``i`` sits at absolute position ``q_offset + i`` (default ``kv_len - q_len``, queries are the
        newest keys); it attends key ``j`` of a selected block when ``j <= q_offset + i``.
        """
        offset = kv_len - q_len if q_offset is None else q_offset
        bs, qbs = self.kv_block_size, self.query_block_size
        b, h, nqb, s = self.indices.shape
        device = self.indices.device
        q_start = offset + torch.arange(nqb, device=device) * qbs  # [Qblk]
        q_end = torch.clamp(q_start + qbs, max=offset + q_len) - 1  # [Qblk], inclusive
        k_start = self.indices.long() * bs  # [B, H, Qblk, S]
        k_end = torch.clamp(k_start + bs, max=kv_len) - 1
        qs = q_start.view(1, 1, nqb, 1)
        qe = q_end.view(1, 1, nqb, 1)
        # Rows that see the whole block contribute its length; rows crossing it contribute an arithmetic series.
        full_from = torch.maximum(qs, k_end)
        n_full = (qe - full_from + 1).clamp(min=0)
        length = k_end - k_start + 1
        lo = torch.maximum(qs, k_start)
        hi = torch.minimum(qe, k_end - 1)
        n_part = (hi - lo + 1).clamp(min=0)
        # Row at position p sees p - k_start + 1 keys; sum over p in [lo, hi].
        part = n_part * (lo + hi - 2 * k_start + 2) // 2
        per = torch.where(self.indices >= 0, n_full * length + part, torch.zeros_like(k_start))
        return per.sum(dim=(-1, -2))


def causal_pairs(q_len: int, kv_len: int) -> int:
    """Number of causal query-key pairs when ``q_len`` newest queries attend ``kv_len`` keys."""
    offset = kv_len - q_len
    return q_len * offset + q_len * (q_len + 1) // 2
