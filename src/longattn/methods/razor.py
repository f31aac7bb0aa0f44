"""RazorAttention-style heads: ``duo``'s split plus one compensation token for what streaming heads drop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longattn.core.selection import Selection
from longattn.methods.base import SelectionContext
from longattn.methods.duo import Duo
from longattn.ops.merge import merge_attention
from longattn.ops.summary_attention import masked_block_sums


@dataclass
class Razor(Duo):
    """Like ``duo``, and each streaming head also attends one compensation token: the mean key and mean
    value of the keys it dropped (those between its sinks and its window).

    The token enters the softmax with score ``q . mean_k * scale + log(n)`` for ``n`` dropped keys, so it
    stands for the dropped keys as a group (``sum_i exp(q . k_i)`` is at least ``n exp(q . mean_k)`` by
    Jensen) rather than as one more key among thousands. Retrieval heads lose nothing and get no token.
    Paper: RazorAttention: Efficient KV Cache Compression Through Retrieval Heads, https://arxiv.org/abs/2407.15891
    """

    name: ClassVar[str] = "razor"
    paper: ClassVar[str] = "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads https://arxiv.org/abs/2407.15891"
    adjusts_output: ClassVar[bool] = True

    def adjust_output(
        self, out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, selection: Selection, ctx: SelectionContext,
        scale: float,
    ) -> Tensor:
        """Merge the compensation token into every streaming head's output: ``[B, Hq, Tq, D]``.

        Only the streaming heads' ``lse`` is read (the retrieval heads' is NaN where the operator ran them as
        dense heads)."""
        b, hq, tq, d = q.shape
        hkv = k.shape[1]
        streaming = ~self.head_mask(ctx.layer, hq, hkv, q.device)
        if not bool(streaming.any()):
            return out
        k_mean, v_mean, count = self.compensation(k, v, tq, ctx, selection.query_block_size)  # per query block
        qbs = selection.query_block_size
        # Expand per query block to per query row: [B, Hkv, Tq, D].
        k_rows = k_mean.repeat_interleave(qbs, dim=2)[:, :, :tq]
        v_rows = v_mean.repeat_interleave(qbs, dim=2)[:, :, :tq]
        log_n = torch.log(count.float()).repeat_interleave(qbs, dim=-1)[:, :tq]  # [B, Tq], -inf where none
        g = hq // hkv
        score = torch.einsum("bkgtd,bktd->bkgt", q.float().view(b, hkv, g, tq, d), k_rows).reshape(b, hq, tq)
        lse_c = score * scale + log_n.view(b, 1, tq)
        out_c = v_rows.repeat_interleave(g, dim=1).to(out.dtype)
        merged, _ = merge_attention(out, lse, out_c, lse_c)
        return torch.where(streaming.view(1, hq, 1, 1), merged, out)

    def compensation(
        self, k: Tensor, v: Tensor, q_len: int, ctx: SelectionContext, qbs: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean key and value of the keys a streaming head drops, per query block.

        The dropped keys of a query block are the whole blocks after its sink blocks and before its window,
        a contiguous run, so prefix sums over block sums give every query block's means in ``O(T D)``.

        Args:
            k, v: ``[B, Hkv, Tk, D]``.

        Returns:
            ``k_mean, v_mean [B, Hkv, Qblk, D]`` float32 and ``count [B, Qblk]`` int64 dropped valid keys.
        """
        b, hkv, _, d = k.shape

        def prefix(x: Tensor) -> tuple[Tensor, Tensor]:  # sums of blocks < i: [B, Hkv, Nblk + 1, D], [B, Nblk + 1]
            sums, valid = masked_block_sums(x, self.block_size, ctx.key_mask)
            return (torch.nn.functional.pad(sums.cumsum(2), (0, 0, 1, 0)),
                    torch.nn.functional.pad(valid.cumsum(1), (1, 0)))

        (k_sums, counts), (v_sums, _) = prefix(k), prefix(v)
        # The dropped run of each query block: after its sink blocks, before its window (core.pattern).
        low, hi = self.pattern(q_len, ctx, qbs).dropped_run(b)  # [B, Qblk]

        def run(p: Tensor) -> Tensor:  # [B, Hkv, Nblk + 1, D] -> [B, Hkv, Qblk, D]
            at = lambda idx: p.gather(2, idx.view(b, 1, -1, 1).expand(-1, hkv, -1, d))  # noqa: E731
            return at(hi) - at(low)

        count = counts.gather(1, hi) - counts.gather(1, low)  # [B, Qblk]
        denom = count.clamp(min=1).view(b, 1, -1, 1)
        return run(k_sums) / denom, run(v_sums) / denom, count.round().long()

