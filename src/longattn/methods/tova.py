"""TOVA, a second eviction baseline: a fixed-size cache per KV head, pruned by the current query at every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longattn.core.selection import Selection
from longattn.methods.base import SelectionContext
from longattn.methods.snapkv import SnapKV


@dataclass
class TOVA(SnapKV):
    """Token Omission Via Attention: at the end of a prompt each KV head keeps the sinks, the ``window`` most
    recent tokens and the ``budget_tokens`` tokens its last query attends most; at every decode step the new
    token joins and, once the cache is over that size, the token the current query attends least leaves
    (sinks and the newest token excepted). Unlike SnapKV, the kept set keeps changing with what is generated.
    Paper: Transformers are Multi-State RNNs (TOVA), https://arxiv.org/abs/2401.06104
    """

    observe: int = 1
    """TOVA ranks by the last query alone."""
    pool: int = 1

    name: ClassVar[str] = "tova"
    paper: ClassVar[str] = "Transformers are Multi-State RNNs https://arxiv.org/abs/2401.06104"

    def select(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Selection:
        """As :meth:`SnapKV.select`; after a decode step's selection, the kept set drops its least attended token
        when it is over budget. ``q [B, Hq, Tq, D]`` -> Selection ``[B, Hkv, Qblk, S]``."""
        selection = super().select(q, summaries, ctx)
        memory: dict[str, Any] = ctx.memory if ctx.memory is not None else {}
        if q.shape[2] == 1 and "kept" in memory:
            memory["kept"] = self.prune(q, ctx, selection.indices[:, :, 0].long())
            memory["evicted_at"] = ctx.kv_len
        return selection

    def prune(self, q: Tensor, ctx: SelectionContext, ids: Tensor) -> Tensor:
        """``ids [B, Hkv, S]`` the tokens this step read -> the ones kept for the next: the least attended
        dropped while more than ``sink_tokens + budget_tokens + window`` remain, ``[B, Hkv, S']`` sorted."""
        size = self.sink_tokens + self.budget_tokens + self.window
        if ids.shape[-1] <= size:
            return ids
        k = self.raw_keys(ctx)
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        keys = k.gather(2, ids.unsqueeze(-1).expand(-1, -1, -1, d)).float()  # [B, Hkv, S, D]
        scores = torch.einsum("bkgd,bksd->bkgs", q[:, :, 0].float().view(b, hkv, hq // hkv, d), keys)
        probs = torch.softmax(scores * ctx.softmax_scale(d), dim=-1).sum(2)  # [B, Hkv, S], over the group
        protected = (ids < self.sink_tokens) | (ids == ctx.kv_len - 1)
        keep = probs.masked_fill(protected, float("inf")).topk(size, dim=-1).indices
        return ids.gather(-1, keep.sort(dim=-1).values)
