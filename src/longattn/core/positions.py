"""Position policies for context extension: the RoPE distance at which each attended key is seen.

Past its trained window a model meets RoPE distances it never saw, and attention breaks even when the right
blocks are selected. A position policy re-encodes the distance of every *far* key (a selected block before
the query block's local window; sinks included) so that each head only sees distances it was trained on;
keys of the local window (:func:`~longattn.core.pattern.window_first_block`) keep their exact distances.
Rotating a post-RoPE vector by ``delta * inv_freq`` gives the vector RoPE would have produced at ``position +
delta``, so the policies work on the cached post-RoPE keys and queries, without touching the model or its cache
(:mod:`longattn.core.rope` reads the model's RoPE and rotates; :mod:`longattn.core.reposition` binds a policy to
it for the operator).

Policies (``Method.positions``):

- ``original``: no change.
- ``longheads`` (LongHeads, https://arxiv.org/abs/2402.10685): the far blocks a query block selected are laid
  out contiguously, in their original order, right before its local window; distances never exceed the
  attended budget.
- ``infllm`` (InfLLM, https://arxiv.org/abs/2402.04617): every far token is seen at one position, just before
  the local window.
- ``self_extend`` (Self-Extend, https://arxiv.org/abs/2401.01325): far distances are grouped, ``d' = q // G -
  k // G + W - W // G`` with ``W`` the local window and ``G`` the group size; the window keeps exact distances.
- ``dca`` (Dual Chunk Attention, ChunkLlama, https://arxiv.org/abs/2402.17463; the extension Qwen2.5-1M uses):
  the sequence is cut into chunks of ``L = chunk_size - local_window`` tokens and every key sits at ``p mod L``;
  a key of the query's own chunk keeps its exact distance, one of the previous chunk is read from query index
  ``min(q mod L + L, chunk_size)``, any earlier one from ``min(2L - 1, chunk_size)``. No distance exceeds
  ``chunk_size``, whatever the length.

A policy whose near and far keys are told apart by whole key blocks of each query block (every policy but
``longheads``, which moves blocks one by one) describes itself as :class:`Region` s: the operator then runs one
exact pass per region through its fastest backend and merges them by log-sum-exp
(:mod:`longattn.ops.block_sparse.regions`), so every pair is scored once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from longattn.core.checks import check_int
from longattn.core.pattern import window_first_block

POLICIES = ("original", "longheads", "infllm", "self_extend", "dca")


@dataclass(frozen=True)
class Region:
    """The selected key blocks ``[lo, hi)`` of each query block that are read with one set of positions.

    Attributes:
        lo, hi: ``[Qblk]`` int64 key-block bounds (``hi`` None: no upper bound).
        query_shift: ``[Qblk, qbs]`` int64 shift of each query row's position when it reads this region, or
            None (real positions).
        moved_keys: whether keys are read with the policy's :meth:`PositionPolicy.token_shift`.
    """

    lo: Tensor
    hi: Tensor | None
    query_shift: Tensor | None
    moved_keys: bool


@dataclass(frozen=True)
class PositionPolicy:
    """Base of the policies: how far keys are re-positioned (:meth:`token_shift`, :meth:`block_shift`,
    :meth:`query_shift`)."""

    score_cap: int | None = field(default=None, kw_only=True)
    """Selection scores of blocks farther than this many tokens are computed as if the block sat exactly this
    far (query and block summary rotated to that distance): at distances the model never saw, RoPE turns a
    query-block score into noise and the needle is not retrieved. None: half the trained window. Applies to
    methods that score rotatable summaries (moba, longheads, infllm); nearer blocks keep their real scores."""

    name: ClassVar[str] = ""
    by_regions: ClassVar[bool] = True
    """Whether :meth:`regions` describes the policy (the operator's region passes apply it)."""
    by_gather: ClassVar[bool] = True
    """Whether the gather path's near/far split applies it (``token_shift``, ``block_shift``, ``query_shift``)."""

    def __post_init__(self) -> None:
        if self.score_cap is not None:
            check_int("score_cap", self.score_cap, 1)

    @property
    def changes_positions(self) -> bool:
        return True

    # A far key at position p of block n, read by a query row at position r of a query block whose window
    # starts at block lo, is seen at distance (r + query_shift) - (p + token_shift(p) + block_shift). Each part
    # is optional; a per-token shift is applied once to the whole key cache, not per gathered copy.

    def token_shift(self, pos: Tensor) -> Tensor | None:
        """Shift of far keys that depends only on their own position: ``pos [...]`` int64 -> ``[...]`` or None."""
        return None

    def block_shift(self, idx: Tensor, far: Tensor, lo: Tensor, bs: int) -> Tensor | None:
        """Shift of each selected far block for each query block: ``idx [B, H, C, W]`` int64 block ids (-1 pad),
        ``far [B, H, C, W]`` bool, ``lo [C]`` first window block -> ``[B, H, C, W, 1]`` int64, or None."""
        return None

    def query_shift(self, rows: Tensor, lo: Tensor, window: int, bs: int) -> Tensor | None:
        """Shift of the queries when they read far keys: ``rows [C, R]`` int64 positions -> ``[C, R]``, or None."""
        return None

    def for_window(self, trained_window: int) -> "PositionPolicy":
        """This policy with settings that default to a share of the model's trained window made concrete."""
        return self

    def regions(self, rows: Tensor, window: int, bs: int) -> list[Region] | None:
        """The regions of :class:`Region` each query block's selection splits into, or None for a policy that
        moves single blocks (only the gather path applies it). ``rows [Qblk, qbs]`` int64 positions of each
        query block's rows. The default: the local window at real positions, everything before it far."""
        lo = window_first_block(rows[:, 0], window, bs)
        return [Region(lo, None, None, False),
                Region(torch.zeros_like(lo), lo, self.query_shift(rows, lo, window, bs), True)]


@dataclass(frozen=True)
class Original(PositionPolicy):
    """No change: every key keeps its real position (what the model does without longattn)."""

    name: ClassVar[str] = "original"
    by_regions: ClassVar[bool] = False  # nothing moves: the gather path applies it as it is

    @property
    def changes_positions(self) -> bool:
        return False


@dataclass(frozen=True)
class LongHeadsLayout(PositionPolicy):
    """LongHeads: far blocks contiguous, in order, ending where the local window starts."""

    name: ClassVar[str] = "longheads"
    by_regions: ClassVar[bool] = False

    def block_shift(self, idx: Tensor, far: Tensor, lo: Tensor, bs: int) -> Tensor | None:
        count = far.sum(dim=-1, keepdim=True)  # [B, H, C, 1]
        rank = far.cumsum(dim=-1) - 1  # order among the far blocks (indices are ascending)
        start = lo.view(1, 1, -1, 1) * bs - (count - rank) * bs  # where block rank r now starts
        return (start - idx * bs).unsqueeze(-1)

    def regions(self, rows: Tensor, window: int, bs: int) -> list[Region] | None:
        return None  # each far block moves by its rank among the selected ones: not one shift per region


@dataclass(frozen=True)
class InfLLMLayout(PositionPolicy):
    """InfLLM: every far token at the position just before the local window."""

    name: ClassVar[str] = "infllm"

    # Key to position 0, query to r - (lo * bs - 1): every far key at distance r - lo * bs + 1.
    def token_shift(self, pos: Tensor) -> Tensor | None:
        return -pos

    def query_shift(self, rows: Tensor, lo: Tensor, window: int, bs: int) -> Tensor | None:
        return (-(lo * bs - 1)).view(-1, 1).expand(rows.shape)


@dataclass(frozen=True)
class SelfExtend(PositionPolicy):
    """Self-Extend: far distances grouped by ``group_size`` and shifted to continue the window's distances.

    Attributes:
        group_size: ``G``; covers contexts up to ``G * (trained window - local window)`` tokens.
    """

    group_size: int = 8
    name: ClassVar[str] = "self_extend"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("group_size", self.group_size, 1)

    # Key at p_k // G, query at p_q // G + W - W // G: d' = p_q // G - p_k // G + W - W // G.
    def token_shift(self, pos: Tensor) -> Tensor | None:
        return pos // self.group_size - pos

    def query_shift(self, rows: Tensor, lo: Tensor, window: int, bs: int) -> Tensor | None:
        g = self.group_size
        return rows // g + (window - window // g) - rows


@dataclass(frozen=True)
class DualChunk(PositionPolicy):
    """Dual Chunk Attention (ChunkLlama): chunk-local key positions, three query positions.

    Chunks hold ``L = chunk_size - local_window`` tokens and a key at position ``p`` is seen at ``p mod L``. A
    query at ``q`` reads the keys of its own chunk at ``q mod L`` (their exact distance), the previous chunk's
    at ``min(q mod L + L, chunk_size)`` (successive-chunk: a query near the boundary keeps the real distance to
    its neighbours) and every earlier chunk's at ``min(2L - 1, chunk_size)`` (inter-chunk). Distances stay below
    ``chunk_size`` at any length. Positions depend on chunk membership, not on the method's window; the
    method's selection decides which blocks are read, the policy only where they are seen.

    Attributes:
        chunk_size: ``s``; None: 3/4 of the model's trained window (the paper's setting).
        local_window: ``w``; None: 1/16 of the trained window. ``L = s - w`` must be a multiple of the method's
            block size and query block size, so no block straddles two chunks.
    """

    chunk_size: int | None = None
    local_window: int | None = None
    name: ClassVar[str] = "dca"
    by_gather: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size is not None:
            check_int("chunk_size", self.chunk_size, 2)
        if self.local_window is not None:
            check_int("local_window", self.local_window, 0)
        if self.chunk_size is not None and self.local_window is not None and self.local_window >= self.chunk_size:
            raise ValueError(f"local_window ({self.local_window}) must be smaller than chunk_size ({self.chunk_size})")

    def for_window(self, trained_window: int) -> "DualChunk":
        chunk = self.chunk_size if self.chunk_size is not None else trained_window * 3 // 4
        local = self.local_window if self.local_window is not None else trained_window // 16
        if chunk >= trained_window:
            raise ValueError(f"chunk_size ({chunk}) must be below the model's trained window ({trained_window})")
        return DualChunk(chunk_size=chunk, local_window=local, score_cap=self.score_cap)

    @property
    def chunk_len(self) -> int:
        if self.chunk_size is None or self.local_window is None:
            raise ValueError("DualChunk's sizes are set from the model's trained window (for_window) first")
        return self.chunk_size - self.local_window

    def token_shift(self, pos: Tensor) -> Tensor | None:
        return pos % self.chunk_len - pos

    def query_shift(self, rows: Tensor, lo: Tensor, window: int, bs: int) -> Tensor | None:
        raise ValueError("positions='dca' places queries by chunk, not by window: it runs through the region path "
                         "(longattn.ops.block_sparse.regions), not the gather path's far/near split")

    def regions(self, rows: Tensor, window: int, bs: int) -> list[Region] | None:
        big, s = self.chunk_len, int(self.chunk_size)  # type: ignore[arg-type]
        qbs = rows.shape[1]
        if big % bs or big % qbs:
            raise ValueError(f"positions='dca' needs chunk_size - local_window ({big}) to be a multiple of the block "
                             f"size ({bs}) and of the query block size ({qbs}), so no block straddles two chunks")
        chunk = rows[:, 0] // big  # [Qblk]; a query block sits inside one chunk (checked by the caller's offset)
        if bool((rows[:, -1] // big != chunk).any()):
            raise ValueError(f"positions='dca': a query block straddles a chunk boundary (chunks of {big} tokens); "
                             f"prefill in chunks whose lengths are multiples of {qbs}")
        per = big // bs
        own, prev = chunk * per, (chunk - 1).clamp(min=0) * per
        succ = torch.clamp(rows % big + big, max=s) - rows
        inter = torch.full_like(rows, min(2 * big - 1, s)) - rows
        return [Region(own, None, None, False), Region(prev, own, succ, True),
                Region(torch.zeros_like(own), prev, inter, True)]


_BY_NAME: dict[str, type[PositionPolicy]] = {
    cls.name: cls for cls in (Original, LongHeadsLayout, InfLLMLayout, SelfExtend, DualChunk)}


def position_policy(spec: "str | PositionPolicy") -> PositionPolicy:
    """The policy ``spec`` names (one of ``POLICIES``, default settings), or ``spec`` itself if it is one."""
    if isinstance(spec, PositionPolicy):
        return spec
    if isinstance(spec, str) and spec in _BY_NAME:
        return _BY_NAME[spec]()
    raise ValueError(f"positions must be one of {POLICIES} or a longattn.core.positions.PositionPolicy, got {spec!r}")
