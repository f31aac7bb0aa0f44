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
        nqb = -(-tq // qbs)
        sketch = self.key_sketch(k, ctx, tq)
        if sketch is not None and tq == 1:
            basis, projected = sketch  # [B, Hkv, D, r], [B, Hkv, Tk, r]
            g = group_queries(q, hkv)  # [B, Hkv, G, 1, D]
            scores = torch.einsum("bhgtr,bhkr->bhgtk", torch.einsum("bhgtd,bhdr->bhgtr", g, basis), projected)
            return block_max(scores.reshape(b, hq, 1, tk), bs, ctx.key_mask)
        rows = torch.nn.functional.pad(q.float(), (0, 0, 0, nqb * qbs - tq)).view(b, hq, nqb, qbs, d)
        counts = torch.full((nqb,), qbs, device=q.device, dtype=torch.float32)
        counts[-1] = tq - (nqb - 1) * qbs
        mean_q = rows.sum(3) / counts.view(1, 1, -1, 1)  # [B, Hq, Qblk, D]; pad rows are zeros
        causal_hi = self.pattern(tq, ctx, qbs).causal_hi
        return pooled_max_scores(mean_q, k, bs, causal_hi, ctx.key_mask)

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


def block_max(scores: Tensor, block_size: int, key_mask: Tensor | None) -> Tensor:
    """Per-key scores ``[B, H, R, Tk]`` -> the best score of each key block ``[B, H, R, Nblk]``; padding keys
    (``key_mask [B, Tk]`` False) never make a block's maximum (a block of padding only scores -inf)."""
    b, h, r, tk = scores.shape
    nkb = -(-tk // block_size)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.view(b, 1, 1, tk), float("-inf"))
    if tk % block_size:  # only a partial last block needs padding (a copy of every score)
        scores = torch.nn.functional.pad(scores, (0, nkb * block_size - tk), value=float("-inf"))
    # max_pool1d, not amax over a trailing dimension of 16: 2.5x faster on CPU (7.8 vs 19.7 ms for one 16k
    # chunk of scores), the same values.
    pooled = torch.nn.functional.max_pool1d(scores.reshape(-1, 1, nkb * block_size), block_size)
    return pooled.view(b, h, r, nkb)


def pooled_max_scores(
    mean_q: Tensor, k: Tensor, block_size: int, causal_hi: Tensor, key_mask: Tensor | None = None,
    chunk_elements: int = 1 << 23,
) -> Tensor:
    """The best ``q̄ · k`` of every key block for every query block, in chunks of query blocks.

    Each chunk multiplies its mean queries only with the keys its query blocks can see (up to the last
    chunk's ``causal_hi``: about half the products of the full ``Qblk x Tk`` product over a prompt) and keeps
    at most ``chunk_elements`` per-key scores alive, so memory stays linear in the context (the full product
    is ``Tq x Tk / 16`` floats per head: 0.6 GB a layer at 16k). Blocks past a query block's ``causal_hi``
    score -inf: no query of the block may see them.

    Args:
        mean_q: ``[B, Hq, Qblk, D]`` float32, each query block's mean query.
        k: ``[B, Hkv, Tk, D]`` keys (any float dtype; scored in float32).
        causal_hi: ``[Qblk]`` the last key block any query of each query block sees.
        key_mask: ``[B, Tk]`` bool, False at padding keys; None when every key is valid.

    Returns:
        ``[B, Hq, Qblk, Nblk]`` float32.
    """
    b, hq, nqb, d = mean_q.shape
    hkv, tk = k.shape[1], k.shape[2]
    nkb = -(-tk // block_size)
    keys = k.float()
    out = torch.full((b, hq, nqb, nkb), float("-inf"), device=mean_q.device)
    hi = [int(x) for x in causal_hi.tolist()]
    step = max(1, chunk_elements // max(1, b * hq * tk))
    for start in range(0, nqb, step):
        stop = min(nqb, start + step)
        blocks = min(nkb, max(hi[start:stop]) + 1)  # causal_hi is non-decreasing over query blocks
        limit = min(tk, blocks * block_size)
        n = stop - start
        # The GQA group's queries stacked as rows of one product per KV head: a broadcast over the group would
        # copy K once per query head.
        g = group_queries(mean_q[:, :, start:stop], hkv).reshape(b, hkv, -1, d)  # [B, Hkv, G * n, D]
        scores = g @ keys[:, :, :limit].transpose(-1, -2)  # [B, Hkv, G * n, limit]
        mask = None if key_mask is None else key_mask[:, :limit]
        out[:, :, start:stop, :blocks] = block_max(scores.view(b, hq, n, limit), block_size, mask)
    rows = torch.arange(nkb, device=mean_q.device).view(1, 1, 1, -1) > causal_hi.view(1, 1, -1, 1).to(mean_q.device)
    return out.masked_fill(rows, float("-inf"))


def pooled_max_scores_reference(
    mean_q: Tensor, k: Tensor, block_size: int, causal_hi: Tensor, key_mask: Tensor | None = None,
    chunk_elements: int = 1 << 23,
) -> Tensor:
    """:func:`pooled_max_scores` in one product over every key (``Tq x Tk / qbs`` floats per head): the plain
    definition the chunked path is tested against. Same arguments and result."""
    b, hq, nqb, _ = mean_q.shape
    scores = torch.einsum("bhgnd,bhtd->bhgnt", group_queries(mean_q, k.shape[1]), k.float())
    best = block_max(scores.reshape(b, hq, nqb, k.shape[2]), block_size, key_mask)
    beyond = torch.arange(best.shape[-1], device=best.device).view(1, 1, 1, -1) > causal_hi.view(1, 1, -1, 1)
    return best.masked_fill(beyond, float("-inf"))
