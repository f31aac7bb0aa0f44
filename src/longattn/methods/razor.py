"""RazorAttention-style heads: ``duo``'s split plus one compensation token for what streaming heads drop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longattn.core.kv import SplitKV
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
        dense heads). On a head-aware cache ``k`` and ``v`` are None and ``ctx.kv_split`` holds the layer."""
        b, hq, tq, d = q.shape
        hkv = ctx.num_kv_heads
        streaming = ~self.head_mask(ctx.layer, hq, hkv, q.device)
        if not bool(streaming.any()):
            return out
        qbs = selection.query_block_size
        if ctx.kv_split is not None:  # a head-aware cache: streaming KV heads hold sinks + window + dropped sums
            k_mean, v_mean, count = self.split_compensation(ctx.kv_split, tq, ctx, qbs, streaming)
        else:
            k_mean, v_mean, count = self.compensation(k, v, tq, ctx, qbs)  # per query block
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


    def split_compensation(
        self, split: SplitKV, q_len: int, ctx: SelectionContext, qbs: int, streaming: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`compensation` on a head-aware cache: ``k_mean, v_mean [B, Hkv, Qblk, D]``, ``count [B, Qblk]``.

        A streaming KV head holds its sinks, its window and the sums of what it dropped in between; the dropped
        part enters the same prefix sums as one block at the place of the gap (every dropped run starts at or
        before it and ends after it). Full KV heads (whose query heads may still be streaming heads at
        ``query_head`` granularity) use :meth:`compensation` over their keys. ``streaming [Hq]`` bool.
        """
        bs, hkv = self.block_size, split.num_kv_heads
        b, d = split.shape[0], split.shape[3]
        nqb = -(-q_len // qbs)
        k_mean = torch.zeros(b, hkv, nqb, d, device=split.device)
        v_mean = torch.zeros_like(k_mean)
        count = None
        group = streaming.shape[0] // hkv
        wanted = streaming.view(hkv, group).any(1).tolist()
        full = [i for i, h in enumerate(split.full_heads) if wanted[h]]
        if full:
            index = torch.tensor(full, device=split.device)
            km, vm, count = self.compensation(split.full_keys.index_select(1, index),
                                              split.full_values.index_select(1, index), q_len, ctx, qbs)
            heads = [split.full_heads[i] for i in full]
            k_mean[:, heads], v_mean[:, heads] = km, vm
        if split.stream_heads:
            if split.gap and split.dropped is None:
                raise ValueError("razor needs the sums of what the head-aware cache dropped; build the cache for "
                                 "this method (HeadAwareCache.for_method keeps them for methods that adjust outputs)")
            mask = split.stream_key_mask(ctx.key_mask)
            first, shift = split.sink_len // bs, split.gap // bs
            hs = len(split.stream_heads)
            if split.dropped is None:
                dropped = (torch.zeros(b, hs, d, device=split.device), torch.zeros(b, hs, d, device=split.device),
                           torch.zeros(b, device=split.device))
            else:
                dropped = split.dropped

            def prefix(x: Tensor, gone: Tensor) -> tuple[Tensor, Tensor]:
                sums, valid = masked_block_sums(x, bs, mask)  # [B, Hs, Nc, D], [B, Nc]
                sums = torch.cat((sums[:, :, :first], gone.unsqueeze(2), sums[:, :, first:]), dim=2)
                valid = torch.cat((valid[:, :first], dropped[2].view(b, 1), valid[:, first:]), dim=1)
                return (torch.nn.functional.pad(sums.cumsum(2), (0, 0, 1, 0)),
                        torch.nn.functional.pad(valid.cumsum(1), (1, 0)))

            (k_sums, counts), (v_sums, _) = prefix(split.stream_keys, dropped[0]), prefix(split.stream_values,
                                                                                           dropped[1])
            low, hi = self.pattern(q_len, ctx, qbs).dropped_run(b)  # [B, Qblk] blocks of the sequence
            place = lambda n: torch.where(n <= first, n, n - shift + 1)  # noqa: E731 - prefix index of block n
            low, hi = place(low), place(hi)

            def run(p: Tensor) -> Tensor:  # [B, Hs, Nc + 2, D] -> [B, Hs, Qblk, D]
                at = lambda idx: p.gather(2, idx.view(b, 1, -1, 1).expand(-1, hs, -1, d))  # noqa: E731
                return at(hi) - at(low)

            stream_count = counts.gather(1, hi) - counts.gather(1, low)
            denom = stream_count.clamp(min=1).view(b, 1, -1, 1)
            heads = list(split.stream_heads)
            k_mean[:, heads], v_mean[:, heads] = run(k_sums) / denom, run(v_sums) / denom
            count = stream_count.round().long()
        assert count is not None
        return k_mean, v_mean, count
