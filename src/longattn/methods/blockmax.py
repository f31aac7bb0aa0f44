"""BlockMax: a key block scores as its best key, seen by the query block's mean query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longattn.core.checks import check_int
from longattn.methods.base import SelectionContext, group_queries
from longattn.methods.topk import TopKMethod


@dataclass
class BlockMax(TopKMethod):
    """Sinks + window + the ``top_k`` key blocks whose *maximum* ``q̄ · k`` is largest, where ``q̄`` is the mean
    query of the query block (in decode, the query itself) and the maximum runs over every key of the block.

    A block's share of the softmax mass is decided by its few best keys, which a mean key averages away (MoBA)
    and a min/max bound overstates (Quest). Scoring every key with one mean query per query block costs what
    MoBA's scoring costs (``Tk x D`` per query block: one query against every key instead of 16 queries against
    every block mean), and on the default model it keeps what the block oracle keeps: at 4k tokens, 8 blocks
    of 16 plus sinks and window, 0.789 of the mass against the oracle's 0.792 and MoBA's 0.737; 0.60 against
    0.41 in the hidden-sink layers 3-8 (docs/results/quality.md). No block index: it reads the raw keys.

    Decode scores one query against every key, which exactly would be a pass over all of K (half of what
    dense decode reads). With ``decode_rank`` it scores in a low-rank sketch instead (Loki): at the end of
    each prompt the layer's keys give ``decode_rank`` principal directions per KV head, every key is kept
    projected on them, and decode reads ``decode_rank / D`` of K's bytes (0.782 of the mass against exact
    scoring's 0.786 per query on the default model at rank 16 of 64; on Gemma 3 270M's head dimension of 256,
    rank 16 kept 0.635 against exact scoring's 0.717).
    """

    block_size: int = 16
    window: int = 128
    top_k: int = 32
    """Blocks retrieved per query block (32 x 16 = 512 tokens) beyond the sinks and the window."""
    decode_rank: int | None = None
    """Dimensions of the key sketch decode scores in; None: exact scores against every key. A quarter of the
    head dimension held the mass on the default model (16 of 64) but not on Gemma 3 270M (even 32 of 256 kept
    less than MoBA's mean keys: docs/results/quality.md), so it is an option, not the default."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decode_rank is not None:
            check_int("decode_rank", self.decode_rank, 1)

    name: ClassVar[str] = "blockmax"
    paper: ClassVar[str] = (
        "Quest's observation that a block matters through its best key (https://arxiv.org/abs/2406.10774), "
        "scored exactly with a pooled query as in MoBA (https://arxiv.org/abs/2502.13189)"
    )
    summary: ClassVar[str | None] = None

    def block_scores(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        """``q [B, Hq, Tq, D]`` -> ``[B, Hq, Qblk, Nblk]``: the best ``q̄ · k`` of each key block, ``q̄`` the mean
        query of the query block."""
        k = self.raw_keys(ctx)
        b, hq, tq, d = q.shape
        hkv, tk, bs = k.shape[1], k.shape[2], self.block_size
        nkb, nqb = -(-tk // bs), -(-tq // qbs)
        sketch = self.key_sketch(k, ctx, tq)
        if sketch is not None and tq == 1:
            basis, projected = sketch  # [B, Hkv, D, r], [B, Hkv, Tk, r]
            g = group_queries(q, hkv)  # [B, Hkv, G, 1, D]
            scores = torch.einsum("bhgtr,bhkr->bhgtk", torch.einsum("bhgtd,bhdr->bhgtr", g, basis), projected)
            return self._block_max(scores.reshape(b, hq, 1, tk), ctx, nkb)
        rows = torch.nn.functional.pad(q.float(), (0, 0, 0, nqb * qbs - tq)).view(b, hq, nqb, qbs, d)
        counts = torch.full((nqb,), qbs, device=q.device, dtype=torch.float32)
        counts[-1] = tq - (nqb - 1) * qbs
        mean_q = rows.sum(3) / counts.view(1, 1, -1, 1)  # [B, Hq, Qblk, D]; pad rows are zeros
        scores = torch.einsum("bhgnd,bhtd->bhgnt", group_queries(mean_q, hkv), k.float())  # [B, Hkv, G, Qblk, Tk]
        return self._block_max(scores.reshape(b, hq, nqb, tk), ctx, nkb)

    def _block_max(self, scores: Tensor, ctx: SelectionContext, nkb: int) -> Tensor:
        """Per-key scores ``[B, Hq, Qblk, Tk]`` -> the best of each key block ``[B, Hq, Qblk, Nblk]``."""
        b, hq, nqb, tk = scores.shape
        if ctx.key_mask is not None:  # a padding key never makes its block's maximum
            scores = scores.masked_fill(~ctx.key_mask.view(b, 1, 1, tk), float("-inf"))
        scores = torch.nn.functional.pad(scores, (0, nkb * self.block_size - tk), value=float("-inf"))
        return scores.view(b, hq, nqb, nkb, self.block_size).amax(dim=-1)

    def key_sketch(self, k: Tensor, ctx: SelectionContext, tq: int) -> tuple[Tensor, Tensor] | None:
        """``(basis [B, Hkv, D, r], projected keys [B, Hkv, Tk, r])`` float32 for decode, kept in ``ctx.memory``:
        the basis is taken from the keys at the end of each prompt step (their top principal directions), and
        keys that arrive later are projected once, appended in place. None without ``decode_rank`` or memory,
        or before a prompt has been seen."""
        if self.decode_rank is None or ctx.memory is None:
            return None
        memory = ctx.memory
        b, hkv, tk, d = k.shape
        r = min(self.decode_rank, d)
        if tq > 1:  # a prompt (or a chunk of one): the basis and sketch are made again from all its keys
            keys = k.float()
            if ctx.key_mask is not None:
                keys = keys * ctx.key_mask.view(b, 1, tk, 1)
            centred = keys - keys.mean(2, keepdim=True)
            cov = centred.transpose(2, 3) @ centred  # [B, Hkv, D, D]
            basis = torch.linalg.eigh(cov).eigenvectors.flip(-1)[..., :r].contiguous()
            store = torch.empty(b, hkv, tk + max(256, tk // 32), r, device=k.device)
            store[:, :, :tk] = keys @ basis
            memory["sketch"] = (basis, store, tk)
            return None
        if "sketch" not in memory:
            return None
        basis, store, done = memory["sketch"]
        if tk > store.shape[2]:  # out of headroom: grow by a margin, not per token
            grown = torch.empty(b, hkv, tk + max(256, tk // 32), r, device=k.device)
            grown[:, :, :done] = store[:, :, :done]
            store = grown
        if tk > done:
            store[:, :, done:tk] = k[:, :, done:tk].float() @ basis
        memory["sketch"] = (basis, store, tk)
        return basis, store[:, :, :tk]
