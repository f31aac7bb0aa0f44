"""SnapKV, an eviction baseline: after the prompt, each KV head keeps a fixed number of tokens for good."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longattn.core.checks import check_int
from longattn.core.selection import Selection
from longattn.methods.base import Method, SelectionContext
from longattn.methods.dense import Dense
from longattn.ops.sampled import sampled_attention


@dataclass
class SnapKV(Method):
    """Prefill is dense; at its end each KV head keeps the sinks, the last ``window`` tokens and the
    ``budget_tokens`` earlier tokens that the prompt's last ``observe`` queries attend most (summed over the
    head's query group, smoothed over ``pool`` neighbouring keys so that whole phrases survive), and drops the
    rest for good: every decode step, and every later prompt of the conversation (a follow-up question),
    sees only what was kept plus the tokens that came after. Retrieval methods keep every token and choose per
    query; this is what they are compared with at the same budget, and where a follow-up asks about a part
    the first question did not touch, eviction must lose. Paper: SnapKV, https://arxiv.org/abs/2404.14469

    The cache itself still holds every token (the saving is simulated by attending only to the kept ones);
    the memory issue's head-aware cache is what frees them.
    """

    block_size: int = 1
    """Eviction works on single tokens."""
    window: int = 32
    """The most recent tokens at the end of each prompt, always kept (SnapKV's observation window)."""
    sink_tokens: int = 4
    budget_tokens: int = 1024
    """Tokens each KV head keeps beyond the sinks and the window."""
    observe: int = 32
    """Queries at the end of the prompt whose attention votes for the tokens to keep."""
    pool: int = 7
    """Width of the average pooling over keys applied to the votes (odd)."""

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = "SnapKV: LLM Knows What You are Looking for Before Generation https://arxiv.org/abs/2404.14469"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size != 1:
            raise ValueError(f"block_size must be 1 for snapkv (it keeps single tokens), got {self.block_size!r}")
        check_int("budget_tokens", self.budget_tokens, 0)
        check_int("observe", self.observe, 1)
        check_int("pool", self.pool, 1)
        if self.pool % 2 == 0:
            raise ValueError(f"pool must be odd (a window centred on each key), got {self.pool}")

    def select(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Selection:
        """Dense until a prompt has ended, then the kept tokens plus everything after: ``q [B, Hq, Tq, D]`` ->
        Selection ``[B, Hkv, Qblk, S]`` over single-token blocks."""
        memory: dict[str, Any] = ctx.memory if ctx.memory is not None else {}
        b, _, tq, _ = q.shape
        if tq == 1 and "pending" in memory:  # the first decode step: the prompt is over, evict
            memory["kept"], memory["evicted_at"] = memory.pop("pending")
        kept, evicted_at = memory.get("kept"), memory.get("evicted_at", 0)
        if tq > 1:  # a prompt (or a chunk of one): this may be its end, so choose what would be kept
            memory["pending"] = (self.choose(q, ctx, kept, evicted_at), ctx.kv_len)
        if kept is None:
            return Dense(block_size=64).select(q, None, ctx)
        ids = torch.cat([kept, torch.arange(evicted_at, ctx.kv_len, device=q.device).expand(*kept.shape[:2], -1)], -1)
        qbs = 1 if tq == 1 else 16
        nqb = -(-tq // qbs)
        # Each query block reads the live tokens up to its last query; the operator cuts inside the block.
        last = ctx.q_offset + torch.arange(1, nqb + 1, device=q.device) * qbs - 1  # [Qblk]
        rows = ids.unsqueeze(2).expand(-1, -1, nqb, -1)
        visible = rows <= last.view(1, 1, -1, 1)
        indices = torch.where(visible, rows, -1).to(torch.int32).contiguous()  # ids ascending: valid ones first
        return Selection(indices, visible.sum(-1, dtype=torch.int32), qbs, 1)

    def choose(self, q: Tensor, ctx: SelectionContext, kept: Tensor | None, evicted_at: int) -> Tensor:
        """The tokens each KV head would keep if the prompt ended with this step: ``[B, Hkv, K]`` int64 sorted
        positions, the same ``K`` for every head. Tokens already evicted (not in ``kept``, before
        ``evicted_at``) never come back."""
        k = self.raw_keys(ctx)
        b, hq, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        rows = torch.arange(max(0, tq - self.observe), tq, device=q.device)
        probs = sampled_attention(q, k, ctx.softmax_scale(d), rows, ctx.key_mask)  # [B, Hq, n, Tk]
        votes = probs.view(b, hkv, hq // hkv, -1, tk).sum(dim=(2, 3))  # [B, Hkv, Tk]
        votes = torch.nn.functional.avg_pool1d(votes, self.pool, stride=1, padding=self.pool // 2,
                                               count_include_pad=False)
        pos = torch.arange(tk, device=q.device)
        live = torch.ones(b, hkv, tk, dtype=torch.bool, device=q.device)
        if kept is not None:
            live[:, :, :evicted_at] = False
            live.scatter_(-1, kept, True)
        always = (pos < self.sink_tokens) | (pos >= tk - self.window)  # [Tk]
        candidate = live & ~always
        # Every head has as many candidates (the kept ones are equally many), so K is the same for all.
        n = min(self.budget_tokens, int(candidate[0, 0].sum()))
        picked = torch.zeros_like(live)
        if n > 0:
            top = votes.masked_fill(~candidate, float("-inf")).topk(n, dim=-1).indices
            picked.scatter_(-1, top, True)
        keep = (always & live) | picked
        count = int(keep[0, 0].sum())
        return keep.nonzero()[:, 2].view(b, hkv, count)
