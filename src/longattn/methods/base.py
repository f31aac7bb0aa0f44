"""The method contract: a dataclass of config that decides *where* each query block looks.

Every method keeps the attention sinks and a local window (:mod:`longattn.core.pattern`); scored methods
(:mod:`longattn.methods.topk`) add the ``top_k`` key blocks their query ranks highest. A method returns a
:class:`~longattn.core.selection.Selection`; computing attention over it is the operator's job
(:func:`longattn.ops.block_sparse_attention`), never the method's. Two things a method may add, each
declared as a class attribute so that the session reads them instead of guessing: ``summary`` (what the
block index keeps per key block) and ``adjusts_output`` (a correction of the operator's output that is the
method's idea, such as razor's compensation token or ACT's calibration).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

from torch import Tensor

from longattn.core.checks import check_int
from longattn.core.context import SelectionContext
from longattn.core.pattern import StepPattern
from longattn.core.positions import PositionPolicy, position_policy
from longattn.core.selection import Selection

# Elements of a chunk's [B, H, query blocks, key blocks] masks and scores: selection runs chunk by chunk so
# its memory stays linear in the context (the full block-level matrix is quadratic).
_SELECT_CHUNK_ELEMENTS = 1 << 22


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
    """Block summary the method scores against ("mean", "minmax", ...), or None for static patterns."""
    rotatable_scores: ClassVar[bool] = False
    """True where selection reads only ``q`` and summaries that are (means of) RoPE-rotated keys, so a position
    policy may score far blocks at a capped distance (``PositionPolicy.score_cap``). Min/max bounds (Quest)
    and raw-key methods are not rotatable."""
    adjusts_output: ClassVar[bool] = False
    """True where :meth:`adjust_output` changes the operator's output (it then reads keys at their real
    positions, so it cannot run under a position policy that moves them)."""

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

    def streaming_kv_heads(self, layer: int, num_heads: int, num_kv_heads: int) -> tuple[bool, ...] | None:
        """What each KV head of ``layer`` reads, for a head-aware KV cache (:class:`longattn.hf.HeadAwareCache`).

        One flag per KV head: True where every query head of its group reads only the sinks and the local
        window (this method's static pattern, in prefill and in decode), so the cache may drop its other keys.
        A method that declares any such head selects without block summaries and raw keys (``ctx.keys`` is
        None). None, the default: the method may read any key of any head, and the cache keeps everything.
        """
        return None

    def summariser(self) -> "str | Callable[..., Tensor] | None":
        """What the session's BlockIndex keeps per key block (None: no index): ``summary`` by default, a
        configured callable, or what a wrapped method scores."""
        return self.summary

    def query_block_size_for(self, q_len: int) -> int:
        """Query block size for a step of ``q_len`` queries: 1 in decode, else the configured size."""
        return 1 if q_len == 1 else (self.query_block_size or self.block_size)

    def pattern(self, q_len: int, ctx: SelectionContext, qbs: int) -> StepPattern:
        """Sinks, window and causal limits of these ``q_len`` queries with this method's geometry: the one
        ``ctx`` carries, else the step's cached one, else built (and cached in ``ctx.step_cache``)."""
        key = StepPattern.key_of(self.block_size, qbs, self.sink_tokens, self.window, ctx.kv_len, ctx.q_offset, q_len)
        if ctx.pattern is not None and ctx.pattern.key() == key:
            return ctx.pattern
        if ctx.step_cache is not None and key in ctx.step_cache:
            return ctx.step_cache[key]
        built = StepPattern.build(q_len, ctx.kv_len, ctx.q_offset, self.block_size, qbs, self.sink_tokens,
                                  self.window, ctx.key_mask, ctx.device)
        if ctx.step_cache is not None:
            ctx.step_cache[key] = built
        return built

    def select(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Selection:
        """Key blocks for each query block: ``q [B, Hq, Tq, D]`` post-RoPE queries, ``summaries [B, Hkv, Nblk, R,
        D]`` float32 from the layer's BlockIndex (None without one) -> Selection ``[B, H, Qblk, S]``."""
        b, hq, tq, _ = q.shape
        qbs = self.query_block_size_for(tq)
        nqb, nkb = -(-tq // qbs), -(-ctx.kv_len // self.block_size)
        prepared = self.prepare(q, summaries, ctx)
        pattern = self.pattern(tq, ctx, qbs)
        # Scores are per query token before pooling, so a chunk holds qbs rows per query block.
        step = max(1, _SELECT_CHUNK_ELEMENTS // (b * hq * nkb * qbs))
        parts = []
        for first in range(0, nqb, step):
            stop = min(first + step, nqb)
            rows = slice(first * qbs, min(stop * qbs, tq))
            sub = replace(ctx, q_offset=ctx.q_offset + first * qbs, pattern=pattern.rows(first, stop))
            mask = self.block_mask(q[:, :, rows], summaries, sub, qbs, prepared)
            parts.append(Selection.from_mask(mask, qbs, self.block_size))
        return Selection.concat(parts)

    def adjust_output(
        self, out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, selection: Selection, ctx: SelectionContext,
        scale: float,
    ) -> Tensor:
        """Change the operator's attention output (called only when ``adjusts_output`` is True).

        Args:
            out: ``[B, Hq, Tq, D]`` attention over ``selection``; lse: ``[B, Hq, Tq]`` float32 its log-sum-exp
                (NaN on the selection's ``dense_heads``, which the operator ran through SDPA).
            q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` post-RoPE, cache included.

        Returns:
            ``[B, Hq, Tq, D]``. Default: ``out`` unchanged.
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
        return self.pattern(q_len, ctx, qbs).static_mask()

    def causal_block_mask(self, q_len: int, ctx: SelectionContext, qbs: int) -> Tensor:
        """Blocks holding at least one key some query of the block may see: ``[1, 1, Qblk, Nblk]`` bool."""
        return self.pattern(q_len, ctx, qbs).causal_mask()

    def eligible_mask(self, q_len: int, ctx: SelectionContext, qbs: int, static: Tensor) -> Tensor:
        """Blocks a query block may retrieve (causal, not static, not all padding): ``[B or 1, 1, Qblk, Nblk]``."""
        return self.pattern(q_len, ctx, qbs).eligible_mask(static)

    def checked_summaries(self, summaries: Tensor | None, batch: int, ctx: SelectionContext) -> Tensor:
        """``summaries`` ``[B, Hkv, Nblk, R, D]`` of this step, or a clear error naming the expected shape."""
        nkb = -(-ctx.kv_len // self.block_size)
        if summaries is None or summaries.dim() != 5 or summaries.shape[:3] != (batch, ctx.num_kv_heads, nkb):
            got = None if summaries is None else tuple(summaries.shape)
            raise ValueError(
                f"method {self.name!r} needs block summaries [B={batch}, Hkv={ctx.num_kv_heads}, Nblk={nkb}, R, D] "
                f"({self.summariser()!r}), got {got}"
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


def group_queries(q: Tensor, num_kv_heads: int) -> Tensor:
    """``[B, Hq, T, D] -> [B, Hkv, G, T, D]`` float32, query heads grouped by the KV head they read."""
    b, hq, t, d = q.shape
    return q.float().view(b, num_kv_heads, hq // num_kv_heads, t, d)
