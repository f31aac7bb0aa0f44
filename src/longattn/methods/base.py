"""The method contract: a dataclass of config that decides *where* each query block looks.

Every method keeps the attention sinks and a local window; scored methods add the ``top_k`` key blocks
their query ranks highest. Execution is the shared operator's job, never the method's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from longattn.core.checks import check_int
from longattn.core.positions import PositionPolicy, Reposition, position_policy
from longattn.core.selection import Selection, window_first_block

# Elements of a chunk's [B, H, query blocks, key blocks] masks and scores: selection runs chunk by chunk so
# its memory stays linear in the context (the full block-level matrix is quadratic).
_SELECT_CHUNK_ELEMENTS = 1 << 22


@dataclass
class SelectionContext:
    """What a method may know about the step besides the queries.

    Attributes:
        kv_len: keys in the cache after this step (``Tk``).
        q_offset: absolute position of query row 0 (``Tk - Tq`` for a causal decoder).
        layer: layer index.
        num_kv_heads: ``Hkv``.
        key_mask: ``[B, Tk]`` bool, False on padding keys; None when every key is valid.
        device: where the step's tensors live.
        keys: ``[B, Hkv, Tk, D]`` this layer's post-RoPE keys, cache included (a view, never a copy), for
            methods that score raw keys instead of block summaries; None where the caller has none.
        reposition: the session's position policy when it moves keys (None otherwise); methods with
            ``rotatable_scores`` score far blocks at its capped distance.
        backend: the attention backend this step runs on, resolved ("reference", "cpu", "triton", "flex");
            on "triton", methods with a ``fused_score`` select through the fused block top-k kernel.
    """

    kv_len: int
    q_offset: int
    layer: int
    num_kv_heads: int
    key_mask: Tensor | None = None
    device: torch.device = torch.device("cpu")
    keys: Tensor | None = None
    reposition: Reposition | None = None
    backend: str = "reference"


@dataclass
class Method:
    """Base of every method: sinks + local window, causal, over blocks of ``block_size`` keys."""

    block_size: int = 64
    """Keys per key block, a power of two. Smaller blocks select more precisely; larger ones score faster."""
    sink_tokens: int = 4
    """Initial tokens always attended (attention sinks, StreamingLLM); rounded up to whole blocks."""
    window: int = 256
    """Local window: tokens before each query always attended; the query's own block is always kept."""
    query_block_size: int | None = None
    """Queries sharing one selection in prefill. Default: ``block_size`` for static patterns, and at most 16
    for scored methods, whose max-pooled selection loses the one query that needs a block when many share
    it (measured: a 2k passkey found in 1/4 prompts with 64-query blocks, 3/4 with 16). Decode always
    selects per token."""
    positions: "str | PositionPolicy" = "original"
    """Context extension: the RoPE distance far keys (selected blocks before the local window) are seen at:
    "original", "longheads" (laid out contiguously before the window), "infllm" (one distance just past the
    window), "self_extend" (grouped distances), or a policy object from ``longattn.core.positions`` (e.g.
    ``SelfExtend(group_size=16)``). The local window always keeps exact distances."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str | None] = None
    """Block summary the method scores against ("mean", "minmax"), or None for static patterns."""
    rotatable_scores: ClassVar[bool] = False
    """True where selection reads only ``q`` and summaries that are (means of) RoPE-rotated keys, so a position
    policy may score far blocks at a capped distance (``PositionPolicy.score_cap``). Min/max bounds (Quest)
    and raw-key methods are not rotatable."""

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1, power_of_two=True)
        check_int("sink_tokens", self.sink_tokens, 0)
        check_int("window", self.window, 0)
        if self.query_block_size is not None:
            check_int("query_block_size", self.query_block_size, 1, power_of_two=True)
        position_policy(self.positions)  # a bad name fails here, at construction

    def position_policy(self) -> PositionPolicy:
        """The :class:`~longattn.core.positions.PositionPolicy` that ``positions`` names."""
        return position_policy(self.positions)

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` when this method cannot run on ``model`` (``apply`` calls it on entry).

        Default: every supported model fits. Per-head methods check the layout their profile was made for.
        """

    def summariser(self) -> "str | Callable[..., Tensor]":
        """What the session's BlockIndex keeps per key block: ``summary`` by default, or a configured callable."""
        return self.summary  # type: ignore[return-value]

    def q_block_size(self, q_len: int) -> int:
        """Query block size for a step of ``q_len`` queries: 1 in decode, else the configured size."""
        return 1 if q_len == 1 else (self.query_block_size or self.block_size)

    def select(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Selection:
        """Choose key blocks for each query block.

        Args:
            q: ``[B, Hq, Tq, D]`` post-RoPE queries of this step.
            summaries: ``[B, Hkv, Nblk, R, D]`` float32 block summaries from the layer's BlockIndex (None when
                ``summary`` is None).
            ctx: step context.

        Returns:
            Selection ``[B, H, Qblk, S]``.
        """
        b, hq, tq, _ = q.shape
        qbs = self.q_block_size(tq)
        nqb, nkb = -(-tq // qbs), -(-ctx.kv_len // self.block_size)
        prepared = self.prepare(q, summaries, ctx)
        # Scores are per query token before pooling, so a chunk holds qbs rows per query block.
        step = max(1, _SELECT_CHUNK_ELEMENTS // (b * hq * nkb * qbs))
        parts = []
        for first in range(0, nqb, step):
            rows = slice(first * qbs, min((first + step) * qbs, tq))
            sub = replace(ctx, q_offset=ctx.q_offset + first * qbs)
            mask = self.block_mask(q[:, :, rows], summaries, sub, qbs, prepared)
            parts.append(Selection.from_mask(mask, qbs, self.block_size))
        return Selection.concat(parts)

    def fast_attention(
        self, q: Tensor, k: Tensor, v: Tensor, selection: Selection, scale: float, key_mask: Tensor | None,
        ctx: SelectionContext, backend: str = "auto",
    ) -> tuple[Tensor, Tensor] | None:
        """A method-specific way to compute the attention over ``selection``, or None for the shared operator.

        Must equal ``block_sparse_attention(q, k, v, selection, scale, key_mask=key_mask)`` (its reference);
        ``lse`` may be NaN on heads whose path does not produce one (the method's own ``adjust_output`` must
        not read those). ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]`` -> ``(out [B, Hq, Tq, D], lse [B, Hq, Tq])``.
        Default: None.
        """
        return None

    def adjust_output(
        self, out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, selection: Selection, ctx: SelectionContext,
        scale: float,
    ) -> Tensor:
        """Change the attention output after the operator (or :meth:`fast_attention`) ran: calibration, compensation.

        Args:
            out: ``[B, Hq, Tq, D]`` attention over ``selection``; lse: ``[B, Hq, Tq]`` float32 its log-sum-exp.
            q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` post-RoPE, cache included.

        Returns:
            ``[B, Hq, Tq, D]``. Default: ``out`` unchanged (selection-only methods never override this).
        """
        return out

    def prepare(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Any:
        """Work done once per step for all query chunks (a clustering, a per-head plan), handed to every
        :meth:`block_mask` call as ``prepared``. Doing it per chunk would repeat it T / chunk times, and a
        decision that depends on the whole step (FlexPrefill's last query block) would differ between chunks.
        Default: nothing.
        """
        return None

    def block_mask(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        """``[B, H, Qblk, Nblk]`` bool mask of selected blocks; the static part is sinks + window."""
        b, hq, tq, _ = q.shape
        return self.static_mask(tq, ctx, qbs).expand(b, hq, -1, -1)

    def static_mask(self, q_len: int, ctx: SelectionContext, qbs: int) -> Tensor:
        """Sinks + local window, causal: ``[B or 1, 1, Qblk, Nblk]`` bool.

        The sinks are the first ``sink_tokens`` *valid* keys of each row: in a left-padded row they start
        after the padding, where the row's own first tokens are.
        """
        bs = self.block_size
        nkb = -(-ctx.kv_len // bs)
        first, last = self._query_span(q_len, ctx, qbs)
        blocks = torch.arange(nkb, device=first.device).view(1, 1, -1)  # [1, 1, Nblk]
        lo = window_first_block(first, self.window, bs)
        window = (blocks >= lo.view(1, -1, 1)) & (blocks <= (last // bs).view(1, -1, 1))  # [1, Qblk, Nblk]
        start = self._first_keys(ctx).view(-1, 1, 1)
        sinks = (blocks >= start // bs) & (blocks * bs < start + self.sink_tokens)  # [B or 1, 1, Nblk]
        causal = blocks <= (last // bs).view(1, -1, 1)
        return ((sinks & causal) | window).unsqueeze(1)

    def causal_block_mask(self, q_len: int, ctx: SelectionContext, qbs: int) -> Tensor:
        """Blocks holding at least one key some query of the block may see: ``[1, 1, Qblk, Nblk]`` bool."""
        nkb = -(-ctx.kv_len // self.block_size)
        _, last = self._query_span(q_len, ctx, qbs)
        blocks = torch.arange(nkb, device=last.device).view(1, -1)
        return (blocks <= (last // self.block_size).view(-1, 1)).view(1, 1, -1, nkb)

    def eligible_mask(self, q_len: int, ctx: SelectionContext, qbs: int, static: Tensor) -> Tensor:
        """Blocks a query block may retrieve: causal, not already static, not all padding.

        Returns ``[B or 1, 1, Qblk, Nblk]`` bool.
        """
        nkb = -(-ctx.kv_len // self.block_size)
        eligible = self.causal_block_mask(q_len, ctx, qbs) & ~static
        has_key = self._blocks_with_keys(ctx)
        if has_key is not None:
            eligible = eligible & has_key.view(has_key.shape[0], 1, 1, nkb)
        return eligible

    def _first_keys(self, ctx: SelectionContext) -> Tensor:
        """Position of each row's first valid key (after left padding): ``[B]``, or ``[1]`` zeros without a mask."""
        if ctx.key_mask is None:
            return torch.zeros(1, dtype=torch.long, device=ctx.device)
        return ctx.key_mask.int().argmax(dim=1)

    def _blocks_with_keys(self, ctx: SelectionContext) -> Tensor | None:
        """``[B, Nblk]`` bool, False for blocks of padding only; None when every key is valid."""
        if ctx.key_mask is None:
            return None
        b, nkb = ctx.key_mask.shape[0], -(-ctx.kv_len // self.block_size)
        pad = nkb * self.block_size - ctx.kv_len
        return torch.nn.functional.pad(ctx.key_mask, (0, pad)).view(b, nkb, -1).any(-1)

    def checked_summaries(self, summaries: Tensor | None, batch: int, ctx: SelectionContext) -> Tensor:
        """``summaries`` ``[B, Hkv, Nblk, R, D]`` of this step, or a clear error naming the expected shape."""
        nkb = -(-ctx.kv_len // self.block_size)
        if summaries is None or summaries.dim() != 5 or summaries.shape[:3] != (batch, ctx.num_kv_heads, nkb):
            got = None if summaries is None else tuple(summaries.shape)
            raise ValueError(
                f"method {self.name!r} needs block summaries [B={batch}, Hkv={ctx.num_kv_heads}, Nblk={nkb}, R, D] "
                f"({self.summary!r}), got {got}"
            )
        return summaries

    def raw_keys(self, ctx: SelectionContext) -> Tensor:
        """``ctx.keys`` ``[B, Hkv, Tk, D]``, or a clear error for a caller that did not pass them."""
        if ctx.keys is None or ctx.keys.dim() != 4 or ctx.keys.shape[2] != ctx.kv_len:
            got = None if ctx.keys is None else tuple(ctx.keys.shape)
            raise ValueError(
                f"method {self.name!r} scores raw keys: SelectionContext.keys must be [B, Hkv, Tk={ctx.kv_len}, D], "
                f"got {got}"
            )
        return ctx.keys

    def _query_span(self, q_len: int, ctx: SelectionContext, qbs: int) -> tuple[Tensor, Tensor]:
        nqb = -(-q_len // qbs)
        first = ctx.q_offset + torch.arange(nqb, device=ctx.device) * qbs
        last = torch.clamp(first + qbs, max=ctx.q_offset + q_len) - 1
        return first, last


# What TopKMethod's fused selection reproduces: scores, pooling, static blocks, eligibility, query blocks.
_FUSED_SELECTION_PARTS = ("score", "pooled_scores", "block_scores", "block_mask", "prepare", "static_mask",
                          "eligible_mask", "causal_block_mask", "q_block_size", "_query_span", "summariser")


@dataclass
class TopKMethod(Method):
    """Sinks + window + the ``top_k`` highest-scoring other blocks. Subclasses define ``score``."""

    top_k: int = 8
    """Key blocks retrieved per query block beyond the sinks and the window."""
    share_kv_heads: bool = False
    """One selection per KV head (max score over its query heads): cheaper, coarser."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("top_k", self.top_k, 0)
        if not isinstance(self.share_kv_heads, bool):
            raise ValueError(f"share_kv_heads must be a bool, got {self.share_kv_heads!r}")

    fused_score: ClassVar[str | None] = None
    """The :mod:`longattn.ops.block_topk` kind ("mean", "minmax") that :meth:`score` computes, letting the
    fused Triton block top-k select for this method on backend "triton"; None: always the PyTorch path."""

    def q_block_size(self, q_len: int) -> int:
        if q_len == 1:
            return 1
        return self.query_block_size or min(self.block_size, 16)

    def select(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Selection:
        if self.uses_fused_topk(ctx):
            return self.fused_select(q, self.checked_summaries(summaries, q.shape[0], ctx), ctx)
        return super().select(q, summaries, ctx)

    def uses_fused_topk(self, ctx: SelectionContext) -> bool:
        """Whether this step selects through the fused kernel: backend "triton", a ``fused_score``, per-head
        selection at real positions, and no subclass change to how scores become a mask."""
        if not (ctx.backend == "triton" and self.fused_score is not None and not self.share_kv_heads
                and ctx.reposition is None):
            return False
        # The kernel reimplements these for the class that declared fused_score: a subclass that changes any
        # of them keeps its own (PyTorch) selection.
        cls = type(self)
        owner = next(c for c in cls.__mro__ if "fused_score" in c.__dict__)
        if any(getattr(cls, name) is not getattr(owner, name) for name in _FUSED_SELECTION_PARTS):
            return False
        from longattn.ops.block_topk import fused_topk_available

        return fused_topk_available()  # an older Triton without tl.topk keeps the PyTorch selection

    def fused_select(self, q: Tensor, summaries: Tensor, ctx: SelectionContext, backend: str = "auto") -> Selection:
        """The Selection of :meth:`select` (static sinks + window, then the ``top_k`` best retrievable blocks)
        with scoring, pooling and top-k fused (:func:`longattn.ops.block_topk.block_topk`): no per-query
        ``[Tq, Nblk]`` score tensor. ``q [B, Hq, Tq, D]``, summaries ``[B, Hkv, Nblk, R, D]``.
        """
        from longattn.ops.block_topk import block_topk

        b, hq, tq, _ = q.shape
        bs, qbs = self.block_size, self.q_block_size(tq)
        nkb = -(-ctx.kv_len // bs)
        dev = q.device
        first, last = self._query_span(tq, ctx, qbs)
        win_lo, last_blk = window_first_block(first, self.window, bs), last // bs  # [Qblk]
        start = self._first_keys(ctx).to(dev).expand(b)
        has_key = self._blocks_with_keys(ctx)
        # Same sinks as static_mask: blocks from the first valid key's up to the one holding sink token S-1.
        sink_lo, sink_hi = start // bs, -(-(start + self.sink_tokens) // bs)
        if backend == "auto":
            backend = "triton" if ctx.backend == "triton" else "reference"
        if self.top_k > 0:
            top = block_topk(q, summaries, self.fused_score, self.top_k, qbs, win_lo, sink_lo, sink_hi, has_key,
                             backend=backend)
        else:
            top = torch.full((b, hq, first.shape[0], 0), -1, dtype=torch.int32, device=dev)
        # Widths from bounds, not from the tensors (reading those back would stall a GPU every call); unused
        # slots become -1 padding. Sinks span at most ceil(S / bs) + 1 blocks from any start; the window runs
        # from the block of first - window to that of first + qbs - 1: at most (qbs - 1 + window) // bs + 2.
        ws = -(-self.sink_tokens // bs) + 1
        ww = (qbs - 1 + self.window) // bs + 2
        sinks = sink_lo.view(b, 1, 1, 1) + torch.arange(ws, device=dev)  # [B, 1, 1, Ws]
        sinks = sinks.expand(b, 1, first.shape[0], ws)
        sink_ok = (sinks < sink_hi.view(b, 1, 1, 1)) & (sinks < win_lo.view(1, 1, -1, 1))
        window = win_lo.view(1, 1, -1, 1) + torch.arange(ww, device=dev)  # [1, 1, Qblk, Ww]
        window_ok = window <= last_blk.view(1, 1, -1, 1)
        ids = torch.cat([
            torch.where(sink_ok, sinks, nkb).expand(b, hq, -1, -1),
            torch.where(window_ok, window, nkb).expand(b, hq, -1, -1),
            torch.where(top >= 0, top.long(), nkb),
        ], dim=-1).sort(dim=-1).values
        kept = ids < nkb
        indices = torch.where(kept, ids, -1).to(torch.int32).contiguous()
        return Selection(indices, kept.sum(-1, dtype=torch.int32), qbs, bs)

    def score(self, q: Tensor, summaries: Tensor) -> Tensor:
        """Per-query block scores: ``q [B, Hq, Tq, D]``, summaries ``[B, Hkv, Nblk, R, D]`` -> ``[B, Hq, Tq, Nblk]``."""
        raise NotImplementedError

    def block_mask(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        b, hq, tq, _ = q.shape
        static = self.static_mask(tq, ctx, qbs)
        scores = self.block_scores(q, summaries, ctx, qbs, prepared)  # [B, Hq, Qblk, Nblk]
        if self.share_kv_heads:
            scores = scores.view(b, ctx.num_kv_heads, -1, *scores.shape[2:]).amax(dim=2)
        return static | top_blocks(scores, self.eligible_mask(tq, ctx, qbs, static), self.top_k)

    def block_scores(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        """Score of every key block for every query block: ``[B, Hq, Qblk, Nblk]`` float32 (higher = keep).

        The default pools :meth:`score` over each query block's queries; methods whose score is not per query
        token (hierarchical, clustered, adaptive) override this instead.
        """
        return self.pooled_scores(q, self.checked_summaries(summaries, q.shape[0], ctx), qbs, ctx)

    def pooled_scores(self, q: Tensor, summaries: Tensor, qbs: int, ctx: SelectionContext | None = None) -> Tensor:
        """Max over each query block's queries of the per-query scores: ``[B, Hq, Qblk, Nblk]`` float32.

        The max keeps a block that any single query of the block needs, the closest a shared selection gets
        to per-token retrieval. Under a position policy (``ctx.reposition``) far blocks of a method with
        ``rotatable_scores`` are scored at the policy's capped distance.
        """
        b, hq, tq, _ = q.shape
        nqb = -(-tq // qbs)
        scores = self.score(q, summaries)  # [B, Hq, Tq, Nblk]
        if ctx is not None and ctx.reposition is not None and self.rotatable_scores:
            scores = ctx.reposition.capped_scores(self.score, q, summaries, scores, ctx.q_offset, self.block_size)
        # Padding rows of the last block take -inf so they never win the max.
        scores = torch.nn.functional.pad(scores, (0, 0, 0, nqb * qbs - tq), value=float("-inf"))
        return scores.view(b, hq, nqb, qbs, -1).amax(dim=3)


def top_blocks(scores: Tensor, eligible: Tensor, k: int) -> Tensor:
    """The ``k`` highest-scoring eligible blocks of each row (fewer where fewer are eligible).

    Args:
        scores: ``[B, H, Qblk, Nblk]`` float; higher is better.
        eligible: bool, broadcastable to ``scores``.

    Returns:
        ``[B, H, Qblk, Nblk]`` bool.
    """
    # A non-finite score (NaN, 0 * inf in a bound) is never picked and must not take a slot from a real one.
    scores = scores.masked_fill(~eligible | ~torch.isfinite(scores), float("-inf"))
    picked = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    k = min(k, scores.shape[-1])
    if k > 0:
        top = scores.topk(k, dim=-1)
        picked = picked.scatter(-1, top.indices, torch.isfinite(top.values))
    return picked


def group_queries(q: Tensor, num_kv_heads: int) -> Tensor:
    """``[B, Hq, T, D] -> [B, Hkv, G, T, D]`` float32, query heads grouped by the KV head they read."""
    b, hq, t, d = q.shape
    return q.float().view(b, num_kv_heads, hq // num_kv_heads, t, d)
