"""Scored methods: sinks + window + the ``top_k`` key blocks each query block scores highest.

A subclass defines only its idea, :meth:`TopKMethod.score` (or :meth:`TopKMethod.block_scores` when its score
is not per query token); pooling over a query block, eligibility and the top-k are shared here. Where the
score is one the fused Triton kernel computes, the class says so with ``fused_score`` and, on backend
"triton", selection runs fused (:func:`longattn.ops.block_topk.block_topk`).

Five quality mechanisms are options of every scored method (off by default, like ``positions``):
``top_p`` (an adaptive budget: the fewest blocks whose estimated mass reaches p), ``exact_last`` (the step's
last query block selects by its exact attention mass), ``compensate`` (every block left out enters once as
its summary token, :mod:`longattn.ops.summary_attention`), ``min_layer_mass`` (a layer whose budget cannot
hold the mass runs dense) and ``hidden_sinks`` (the blocks that draw far attention are kept everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import math

import torch
from torch import Tensor

from longattn.core.checks import check_fraction, check_int
from longattn.core.selection import Selection
from longattn.methods.base import Method, SelectionContext
from longattn.methods.dense import Dense
from longattn.ops.block_topk.pick import top_blocks, top_p_blocks
from longattn.ops.merge import merge_attention
from longattn.ops.sampled import block_sums, sample_positions, sampled_attention
from longattn.ops.summary_attention import block_means, summary_attention


@dataclass
class TopKMethod(Method):
    """Sinks + window + the ``top_k`` highest-scoring other blocks. Subclasses define ``score``."""

    top_k: int = 8
    """Key blocks retrieved per query block beyond the sinks and the window."""
    share_kv_heads: bool = False
    """One selection per KV head (max score over its query heads): cheaper, coarser."""
    top_p: float | None = None
    """Adaptive budget (Twilight's top-p, FlexPrefill's gamma): per head and query block, the fewest retrievable
    blocks, best first, whose estimated share of the softmax mass reaches ``top_p`` with the sinks and the
    window counted first; ``top_k`` caps it. The estimate reads the scores as logits (``score * scale +
    log(block_size)``). None: always ``top_k``. The budget used shows in the session's density."""
    exact_last: bool = False
    """The step's last query block (in prefill, the one that writes the first answer token) picks its blocks by
    the exact attention mass its queries put on them (a dense pass of those ``query_block_size`` rows, ``O(qbs
    x Tk)``), not by the scoring rule. Decode steps select by the rule."""
    min_layer_mass: float | None = None
    """Layer-aware budget: at each prompt step, a layer whose best blocks at this budget would hold less than
    this share of the softmax mass (the oracle at ``top_k`` plus sinks and window, measured on 16 sampled
    query rows, ``O(16 x Tk)`` per head) runs dense for that step and the decode steps after it. On the
    default model the first layers spread attention too widely for any 10% selection (docs/results/quality.md).
    None: every layer selects."""
    hidden_sinks: int = 0
    """Sink-aware selection: at each prompt step, per head, the ``hidden_sinks`` key blocks (beyond the sinks
    and each row's window) that draw the most attention from 16 sampled query rows (exact attention of those
    rows, ``O(16 x Tk)`` per head) join every query block's selection that may read them, at this step and the
    decode steps after it, on top of ``top_k``. On the default model layers 3-8 put much of their attention on
    such tokens spread through the text (docs/results/heads.md), which no query-block rule ranks first. 0: off."""
    compensate: bool = False
    """Every key block the selection leaves out still enters each query's softmax once, as one token with the
    block's mean key (plus ``log(count)``) and mean value, merged by log-sum-exp: ``O(Tk / block_size)`` more
    work per query (:func:`longattn.ops.summary_attention.summary_attention`). Reads keys at their real
    positions, so it does not combine with a ``positions`` policy."""

    fused_score: ClassVar[str | None] = None
    """The :mod:`longattn.ops.block_topk` kind ("mean", "minmax") that :meth:`score` computes, letting the
    fused Triton block top-k select for this method on backend "triton"; None: always the PyTorch path. A
    capability of the class that declares it: a subclass that changes how scores become a selection sets it
    back to None."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("top_k", self.top_k, 0)
        check_int("hidden_sinks", self.hidden_sinks, 0)
        if not isinstance(self.share_kv_heads, bool):
            raise ValueError(f"share_kv_heads must be a bool, got {self.share_kv_heads!r}")
        for name in ("exact_last", "compensate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.min_layer_mass is not None:
            check_fraction("min_layer_mass", self.min_layer_mass, low_open=False)
        if self.top_p is not None:
            check_fraction("top_p", self.top_p, low_open=True)

    @property
    def adjusts_output(self) -> bool:  # type: ignore[override]
        """True with ``compensate``: the summary tokens are merged into the operator's output."""
        return self.compensate

    @property
    def uses_block_means(self) -> bool:
        """The session keeps every block's mean key and value for this method (``compensate``)."""
        return self.compensate

    def query_block_size_for(self, q_len: int) -> int:
        if q_len == 1:
            return 1
        return self.query_block_size or min(self.block_size, 16)

    def select(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Selection:
        if self.min_layer_mass is not None and self.layer_is_spread(q, ctx):
            return Dense().select(q, summaries, ctx)
        if self.uses_fused_topk(ctx):
            selection = self.fused_select(q, self.checked_summaries(summaries, q.shape[0], ctx), ctx)
        else:
            selection = super().select(q, summaries, ctx)
        if self.exact_last and q.shape[2] > 1:
            selection = self.exact_last_block(q, selection, ctx)
        if self.hidden_sinks > 0 and not selection.all_dense:
            selection = self.with_hidden_sinks(q, selection, ctx)
        return selection

    def with_hidden_sinks(self, q: Tensor, selection: Selection, ctx: SelectionContext) -> Selection:
        """``selection`` plus each head's hidden sink blocks (see ``hidden_sinks``) wherever a query block may
        retrieve them. ``q [B, Hq, Tq, D]`` -> Selection.

        Causal: a query block takes the sinks found by the sampled rows at or before its own last row (their
        accumulated mass), never from later queries. The sinks of the step's last rows are kept in
        ``ctx.memory`` for the decode steps after it (a decode step without them finds them from its query)."""
        b, hq, tq, d = q.shape
        memory = ctx.memory if ctx.memory is not None else {}
        qbs = selection.query_block_size
        pattern = self.pattern(tq, ctx, qbs)
        nkb, nqb = pattern.num_kv_blocks, pattern.num_q_blocks
        static = pattern.static_mask()
        found = memory.get("hidden_sinks")
        if tq > 1 or found is None:
            rows = sample_positions(tq, 16, q.device)  # ascending
            probs = sampled_attention(q, self.raw_keys(ctx), ctx.softmax_scale(d), rows, ctx.key_mask)
            mass = block_sums(probs, self.block_size)  # [B, Hq, n, Nblk]
            own = static[:, :, rows // qbs]  # each sampled row's own sinks and window
            mass = mass.masked_fill(own, 0.0).cumsum(2)  # [B, Hq, n, Nblk]: rows up to each one
            top = mass.topk(min(self.hidden_sinks, nkb), dim=-1)
            states = torch.zeros(b, hq, mass.shape[2] + 1, nkb, dtype=torch.bool, device=q.device)
            states[:, :, 1:].scatter_(-1, top.indices, top.values > 0)  # state 0: no row sampled yet
            last_row = torch.clamp((torch.arange(nqb, device=q.device) + 1) * qbs, max=tq) - 1
            seen = torch.searchsorted(rows, last_row, right=True)  # [Qblk] sampled rows at or before it
            found_blocks = states[:, :, seen]  # [B, Hq, Qblk, Nblk]
            if tq > 1:
                memory["hidden_sinks"] = states[:, :, -1]
        else:
            if found.shape[-1] < nkb:  # decode has opened a new block since the prompt: never a hidden sink
                found = torch.nn.functional.pad(found, (0, nkb - found.shape[-1]))
            found_blocks = found.unsqueeze(2)
        if selection.num_heads != hq:  # share_kv_heads: the KV head keeps any of its query heads' sinks
            found_blocks = found_blocks.view(b, selection.num_heads, -1, *found_blocks.shape[2:]).any(2)
        mask = selection.to_mask(nkb) | (found_blocks & pattern.eligible_mask(static))
        return Selection.from_mask(mask, qbs, self.block_size, selection.dense_heads)

    def layer_is_spread(self, q: Tensor, ctx: SelectionContext) -> bool:
        """Whether this layer runs dense under ``min_layer_mass``: decided at each prompt step from sampled
        rows' attention (the mass the heaviest blocks would hold at this method's budget, averaged over heads
        and rows) and remembered in ``ctx.memory`` for the decode steps that follow. ``q [B, Hq, Tq, D]``."""
        memory = ctx.memory if ctx.memory is not None else {}
        if q.shape[2] == 1:
            return bool(memory.get("spread", False))
        keys = self.raw_keys(ctx)
        rows = sample_positions(q.shape[2], 16, q.device)
        probs = sampled_attention(q, keys, ctx.softmax_scale(q.shape[-1]), rows, ctx.key_mask)  # [B, Hq, n, Tk]
        mass = block_sums(probs, self.block_size).sort(dim=-1, descending=True).values
        bs = self.block_size
        budget = self.top_k + -(-self.sink_tokens // bs) + -(-self.window // bs) + 1
        kept = float(mass[..., : min(budget, mass.shape[-1])].sum(-1).mean())
        memory["spread"] = kept < float(self.min_layer_mass)
        return memory["spread"]

    def exact_last_block(self, q: Tensor, selection: Selection, ctx: SelectionContext) -> Selection:
        """``selection`` with its last query block re-picked by exact attention mass (see ``exact_last``).

        The block's rows attend every key densely (:func:`~longattn.ops.sampled.sampled_attention`); a key
        block's mass is the most any of the rows puts on it, the same max-pooling a shared selection uses.
        ``q [B, Hq, Tq, D]`` -> Selection ``[B, H, Qblk, S]``.
        """
        b, hq, tq, d = q.shape
        qbs, nqb = selection.query_block_size, selection.num_q_blocks
        keys = self.raw_keys(ctx)
        rows = torch.arange((nqb - 1) * qbs, tq, device=q.device)
        probs = sampled_attention(q, keys, ctx.softmax_scale(d), rows, ctx.key_mask)  # [B, Hq, n, Tk]
        mass = block_sums(probs, self.block_size).amax(dim=2, keepdim=True)  # [B, Hq, 1, Nblk]
        if selection.num_heads != hq:  # share_kv_heads: the KV head keeps what any of its query heads needs
            mass = mass.view(b, selection.num_heads, -1, 1, mass.shape[-1]).amax(dim=2)
        pattern = self.pattern(tq, ctx, qbs).rows(nqb - 1, nqb)
        static = pattern.static_mask()
        eligible = pattern.eligible_mask(static)
        if self.top_p is None:
            picked = top_blocks(mass, eligible, self.top_k)
        else:
            picked = top_p_blocks(mass.clamp_min(1e-30).log(), static, eligible, float(self.top_p), self.top_k)
        last = Selection.from_mask((static | picked).expand(b, selection.num_heads, -1, -1).contiguous(), qbs,
                                   self.block_size, selection.dense_heads)
        if nqb == 1:
            return last
        rest = Selection(selection.indices[:, :, :-1], selection.counts[:, :, :-1], qbs, self.block_size,
                         selection.dense_heads)
        return Selection.concat([rest, last])

    def adjust_output(
        self, out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, selection: Selection, ctx: SelectionContext,
        scale: float,
    ) -> Tensor:
        """With ``compensate``: merge the summary tokens of the blocks each query block left out into ``out``
        ``[B, Hq, Tq, D]``; rows whose ``lse`` is NaN (heads the operator ran densely) keep ``out``."""
        if not self.compensate:
            return out
        if ctx.block_means is not None and ctx.key_mask is None:
            k_means, v_means, counts = ctx.block_means
        else:
            k_means, counts = block_means(k, self.block_size, ctx.key_mask)
            v_means, _ = block_means(v, self.block_size, ctx.key_mask)
        out_c, lse_c = summary_attention(q, k_means, v_means, counts, selection.indices, selection.query_block_size,
                                         self.block_size, ctx.q_offset, scale)
        merged, _ = merge_attention(out, lse, out_c, lse_c)
        return torch.where(torch.isnan(lse).unsqueeze(-1), out, merged)

    def uses_fused_topk(self, ctx: SelectionContext) -> bool:
        """Whether this step selects through :func:`longattn.ops.block_topk.block_topk` (scoring, pooling and
        top-k in one pass, from the block ids; no ``[Qblk, Nblk]`` mask to build and sort): a ``fused_score``,
        per-head selection at real positions, and on backend "triton" a Triton with ``tl.topk``. On backend
        "native" its C kernel runs (4x its naive path at 32k tokens), elsewhere the naive PyTorch path
        (measured 1.5x faster than the mask path at 8k with the same Selection)."""
        if self.fused_score is None or self.share_kv_heads or ctx.reposition is not None or self.top_p is not None:
            return False
        if ctx.backend != "triton":
            return True
        from longattn.ops.block_topk import fused_topk_available

        return fused_topk_available()  # an older Triton without tl.topk keeps the PyTorch selection

    def fused_select(self, q: Tensor, summaries: Tensor, ctx: SelectionContext, backend: str = "auto") -> Selection:
        """The Selection of :meth:`select` (static sinks + window, then the ``top_k`` best retrievable blocks)
        with scoring, pooling and top-k fused (:func:`longattn.ops.block_topk.block_topk`): no per-query
        ``[Tq, Nblk]`` score tensor. ``q [B, Hq, Tq, D]``, summaries ``[B, Hkv, Nblk, R, D]``.
        """
        from longattn.ops.block_topk import block_topk

        b, hq, tq, _ = q.shape
        qbs = self.query_block_size_for(tq)
        pattern = self.pattern(tq, ctx, qbs)
        nkb, nqb, dev = pattern.num_kv_blocks, pattern.num_q_blocks, q.device
        if backend == "auto":
            # The top-k follows the attention backend: the fused kernels with the kernels (triton on GPU,
            # native on CPU, where "auto" picks it if it builds), the PyTorch path with the PyTorch paths.
            backend = {"triton": "triton", "native": "auto"}.get(ctx.backend, "naive")
        if self.top_k > 0:
            top = block_topk(q, summaries, self.fused_score, self.top_k, qbs, pattern.window_lo,
                             pattern.sink_lo.expand(b), pattern.sink_hi.expand(b), pattern.has_key, backend=backend)
        else:
            top = torch.full((b, hq, nqb, 0), -1, dtype=torch.int32, device=dev)
        static, kept = pattern.static_ids(b)  # [B, 1, Qblk, W]
        ids = torch.cat([
            torch.where(kept, static, nkb).expand(b, hq, -1, -1),
            torch.where(top >= 0, top.long(), nkb),
        ], dim=-1).sort(dim=-1).values
        kept = ids < nkb
        indices = torch.where(kept, ids, -1).to(torch.int32).contiguous()
        return Selection(indices, kept.sum(-1, dtype=torch.int32), qbs, self.block_size)

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
        eligible = self.eligible_mask(tq, ctx, qbs, static)
        if self.top_p is None:
            return static | top_blocks(scores, eligible, self.top_k)
        logits = scores * ctx.softmax_scale(q.shape[-1]) + math.log(self.block_size)
        return static | top_p_blocks(logits, static, eligible, float(self.top_p), self.top_k)

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
