"""FlexPrefill: each head picks a query-aware or a vertical-slash pattern, and keeps just enough blocks to
cover ``gamma`` of its attention mass."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longattn.core.checks import check_fraction, check_int
from longattn.methods.base import Method, SelectionContext, group_queries
from longattn.ops.block_topk.pick import top_blocks
from longattn.ops.sampled import block_sums, js_distance, mass_cover, sampled_attention


@dataclass(frozen=True)
class Plan:
    """One step's per-head pattern, decided once from the step's last query block (see FlexPrefill.plan).

    Attributes:
        vertical_slash: ``[B, Hq]`` bool, True where the head uses the vertical-slash pattern.
        columns: ``[B, Hq, Nblk]`` bool, key blocks kept as vertical lines; None when unused.
        diagonals: ``[B, Hq, Tk + 1]`` int64, number of kept diagonal offsets ``< o`` at index ``o`` (a prefix
            count, so "is any kept offset in ``[lo, hi]``" costs two lookups); None when unused.
        mass: ``[B, Hq, Nblk]`` float32, the last query block's true attention per key block, which ranks the
            ``min_blocks`` of vertical-slash heads; None when unused.
    """

    vertical_slash: Tensor
    columns: Tensor | None = None
    diagonals: Tensor | None = None
    mass: Tensor | None = None


@dataclass
class FlexPrefill(Method):
    """Context-aware sparse attention: per head and input, the pooled attention of the last query block is
    estimated from mean queries and mean keys and compared with the true one (Jensen-Shannon distance);
    heads where they agree take, per query block, the fewest blocks whose estimated mass reaches ``gamma``
    (query-aware), the others keep the fewest vertical lines and diagonals of the last query block's true
    attention that reach ``gamma`` (vertical-slash). The budget thus adapts to each head and input instead of
    a fixed top-k. Paper: FlexPrefill, https://arxiv.org/abs/2502.20766
    """

    block_size: int = 16
    sink_tokens: int = 16
    window: int = 128
    gamma: float = 0.9
    """Attention mass each head's selection must cover, in (0, 1]: lower is sparser; 1.0 keeps every causal
    block (dense)."""
    tau: float = 0.1
    """Threshold in [0, 1] on the Jensen-Shannon distance (square root of the divergence, nats, at most
    sqrt(ln 2) ~ 0.83) between the estimated and the true block attention: below it the head is query-aware,
    else vertical-slash. 1.0 makes every head query-aware, 0.0 every head vertical-slash."""
    min_blocks: int = 1
    """Retrieved blocks each query block keeps at least, besides the sinks and the window."""

    name: ClassVar[str] = "flexprefill"
    paper: ClassVar[str] = (
        "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference "
        "https://arxiv.org/abs/2502.20766"
    )
    summary: ClassVar[str | None] = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("gamma", self.gamma, low_open=True)
        check_fraction("tau", self.tau, low_open=False)
        check_int("min_blocks", self.min_blocks, 0)

    def query_block_size_for(self, q_len: int) -> int:
        if q_len == 1:
            return 1
        return self.query_block_size or min(self.block_size, 16)

    def prepare(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Plan:
        """Plan every head's pattern once from the whole step: it depends on the step's last query block, which
        a chunk of :meth:`Method.select` may not hold, so planning per chunk would break chunked == one-shot."""
        return self.plan(q, self.checked_summaries(summaries, q.shape[0], ctx), ctx)

    def plan(self, q: Tensor, summaries: Tensor, ctx: SelectionContext) -> Plan:
        """Decide each head's pattern from the last ``query_block_size`` rows of ``q [B, Hq, Tq, D]`` (a full block
        even where the step's last query block is partial), against every key of ``ctx.keys``.

        Decode (``Tq = 1``) and ``gamma = 1`` need no decision (nor raw keys): every head is query-aware.
        """
        b, hq, tq, d = q.shape
        if tq == 1 or self.gamma >= 1.0:
            return Plan(vertical_slash=torch.zeros(b, hq, dtype=torch.bool, device=q.device))
        bs, tk, hkv = self.block_size, ctx.kv_len, ctx.num_kv_heads
        nkb = -(-tk // bs)
        n = min(self.query_block_size_for(tq), tq)
        pos = ctx.q_offset + tq - n + torch.arange(n, device=q.device)  # [n] absolute query positions
        g = group_queries(q[:, :, -n:], hkv)  # [B, Hkv, G, n, D]
        # True attention of the last query block: n x Tk per head, linear in the context.
        rows = torch.arange(tq - n, tq, device=q.device)
        attn = sampled_attention(q, self.raw_keys(ctx), 1 / math.sqrt(d), rows, ctx.key_mask)  # [B, Hq, n, Tk]
        visible = torch.arange(tk, device=q.device).view(1, -1) <= pos.view(-1, 1)  # [n, Tk]
        if ctx.key_mask is not None:
            visible = visible & ctx.key_mask.view(b, 1, 1, 1, tk)

        true = block_sums(attn.sum(2), bs)  # [B, Hq, Nblk]: column mass summed per key block
        true = true / true.sum(-1, keepdim=True).clamp_min(1e-30)
        # Estimate: a block's mass ~ (visible query-key pairs) x exp(mean q . mean k). The pair count is the
        # same for every full block, as in the paper; it only corrects the partly visible diagonal block, which
        # pooled scores alone overrate (and which made every head of a diffuse model look vertical-slash).
        pairs = block_sums(visible.float().sum(-2).view(-1, 1, tk), bs)  # [B or 1, 1, Nblk]
        est_logits = torch.einsum("bhgd,bhnd->bhgn", g.mean(3), summaries[:, :, :, 0]).reshape(b, hq, nkb)
        est = torch.softmax(est_logits / math.sqrt(d) + pairs.log(), dim=-1).nan_to_num(0.0)
        vertical_slash = js_distance(est, true) >= self.tau  # [B, Hq]

        # Lines are kept by whole blocks: the fewest key blocks (vertical) and diagonal bands of block_size
        # offsets (slash, offset = query pos - key pos) covering gamma. Kept single columns would scatter over
        # every block on a diffuse head and select all of them.
        columns = mass_cover(true, self.gamma)  # [B, Hq, Nblk]
        offsets = (pos.view(-1, 1) - torch.arange(tk, device=q.device).view(1, -1)).clamp(min=0)  # [n, Tk]
        slash = torch.zeros(b, hq, tk, device=q.device).scatter_add_(
            -1, offsets.reshape(1, 1, -1).expand(b, hq, -1), attn.reshape(b, hq, -1)
        )  # [B, Hq, Tk] mass per offset; non-causal pairs carry no attention, so clamping their offset adds 0
        bands = mass_cover(block_sums(slash, bs), self.gamma)  # [B, Hq, ceil(Tk / bs)]
        kept = bands.repeat_interleave(bs, dim=-1)[..., :tk].long()  # [B, Hq, Tk] per offset
        diagonals = torch.nn.functional.pad(kept.cumsum(-1), (1, 0))  # [B, Hq, Tk + 1]
        return Plan(vertical_slash, columns, diagonals, true)

    def block_mask(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        """``[B, Hq, Qblk, Nblk]`` bool: sinks + window, plus each head's pattern within the causal blocks.

        ``prepared`` is the step's :class:`Plan` from :meth:`prepare`; without it the pattern is decided from
        ``q``'s own last query block.
        """
        plan = prepared if isinstance(prepared, Plan) else None
        b, hq, tq, d = q.shape
        summaries = self.checked_summaries(summaries, b, ctx)
        static = self.static_mask(tq, ctx, qbs)
        eligible = self.eligible_mask(tq, ctx, qbs, static)  # [B or 1, 1, Qblk, Nblk]
        if self.gamma >= 1.0:
            # Sorted cumulative sums may stop short of 1.0 in float: full budget keeps every block explicitly.
            return (static | eligible).expand(b, hq, -1, -1)
        if plan is None:
            plan = self.plan(q, summaries, ctx)

        scores = self.pooled_scores(q, summaries, qbs).masked_fill(~eligible, float("-inf"))  # [B, Hq, Qblk, Nblk]
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with nothing eligible are NaN
        # Ineligible blocks weigh 0 and sort last, so min_blocks counts eligible ones first.
        picked = mass_cover(probs, self.gamma, self.min_blocks) & eligible
        if bool(plan.vertical_slash.any()):
            assert plan.columns is not None and plan.diagonals is not None and plan.mass is not None
            lines = (plan.columns.unsqueeze(2) | self._diagonal_blocks(tq, ctx, qbs, plan.diagonals)) & eligible
            if self.min_blocks > 0:
                lines = lines | top_blocks(plan.mass.unsqueeze(2), eligible, self.min_blocks)
            picked = torch.where(plan.vertical_slash.view(b, hq, 1, 1), lines, picked)
        return static | picked

    def pooled_scores(self, q: Tensor, summaries: Tensor, qbs: int) -> Tensor:
        """Mean query of each query block against each mean key, scaled: ``[B, Hq, Qblk, Nblk]`` float32."""
        b, hq, tq, d = q.shape
        nqb = -(-tq // qbs)
        # Padding rows of the last query block are zeros and are left out of its mean.
        padded = torch.nn.functional.pad(q.float(), (0, 0, 0, nqb * qbs - tq))
        rows = torch.clamp(tq - torch.arange(nqb, device=q.device) * qbs, max=qbs).view(1, 1, -1, 1)
        pooled = padded.view(b, hq, nqb, qbs, d).sum(3) / rows  # [B, Hq, Qblk, D]
        g = group_queries(pooled, summaries.shape[1])  # [B, Hkv, G, Qblk, D]
        s = torch.einsum("bhgqd,bhnd->bhgqn", g, summaries[:, :, :, 0]) / math.sqrt(d)
        return s.reshape(b, hq, nqb, -1)

    def _diagonal_blocks(self, q_len: int, ctx: SelectionContext, qbs: int, diagonals: Tensor) -> Tensor:
        """Key blocks crossed by a kept diagonal in each query block: ``[B, Hq, Qblk, Nblk]`` bool.

        Query block ``[f, l]`` meets key block ``[s, s + bs - 1]`` along offset ``o`` iff
        ``f - s - bs + 1 <= o <= l - s``.
        """
        bs, tk = self.block_size, ctx.kv_len
        pattern = self.pattern(q_len, ctx, qbs)
        first, last = pattern.first, pattern.last
        start = torch.arange(-(-tk // bs), device=first.device).view(1, -1) * bs  # [1, Nblk]
        lo = (first.view(-1, 1) - start - bs + 1).clamp(0, tk)  # [Qblk, Nblk]
        hi = (last.view(-1, 1) - start + 1).clamp(0, tk)  # exclusive
        b, hq, _ = diagonals.shape
        both = torch.stack((hi, lo)).view(1, 1, -1).expand(b, hq, -1)
        kept_below = diagonals.gather(-1, both).view(b, hq, 2, *hi.shape)  # kept offsets < hi and < lo
        return kept_below[:, :, 0] > kept_below[:, :, 1]
