"""Fused block scoring + top-k in Triton: scores, pooling, eligibility and the running top-k in one pass.

One program owns one query block of one query head (and one slice of the key blocks when split): it scores
``BLOCK_N`` summaries at a time with ``tl.dot``, max-pools over its queries, masks the blocks it may not
retrieve and folds them into a running top-k. Score and block id travel as one int64 key (the float's
order-preserving int32 bits above, the inverted id below), so ``tl.topk`` keeps ids with their scores and
ties go to the lower id. Nothing of size ``[Tq, Nblk]`` is written: per program, ``K`` keys.

Decode (one query per program, many blocks) splits the blocks across programs; the wrapper merges the
per-split candidates with one small ``topk``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from longattn.ops.block_topk.naive import check_topk_inputs
from longattn.ops.triton_utils import check_triton_runs, dot_tile, fill_splits, kernel_flags


# The key of "no block", below every real key. A constexpr: compiled kernels may not read plain globals.
_NO_BLOCK = tl.constexpr(-(2**63))


@triton.jit
def _block_topk_kernel(
    Q, S, KEYS, LIMIT, SINK_LO, SINK_HI, HAS_KEY,
    sqb, sqh, sqt, sqd,
    ssb, ssh, ssn, ssr, ssd,
    Tq, Nblk, blocks_per_split, num_hq, num_qb,
    G: tl.constexpr, QBS: tl.constexpr, D: tl.constexpr, KP: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MINMAX: tl.constexpr, HAS_MASK: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // num_hq).to(tl.int64)  # int64 offsets: summaries of a 1M-token cache are large
    h = (bh % num_hq).to(tl.int64)
    kvh = h // G
    r = tl.arange(0, BLOCK_M)
    tok = (j * QBS + r).to(tl.int64)
    row_ok = (r < QBS) & (tok < Tq)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + b * sqb + h * sqh + tok[:, None] * sqt + d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if MINMAX:
        q_pos = tl.maximum(q, 0.0)
        q_neg = tl.minimum(q, 0.0)
    limit = tl.load(LIMIT + j)
    sink_lo = tl.load(SINK_LO + b)
    sink_hi = tl.load(SINK_HI + b)
    lo = split * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, limit)
    best = tl.full([KP], _NO_BLOCK, tl.int64)
    s_base = S + b * ssb + kvh * ssh
    for n0 in range(lo, hi, BLOCK_N):
        n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        ok = (n < hi) & ((n < sink_lo) | (n >= sink_hi))
        if HAS_MASK:
            ok = ok & (tl.load(HAS_KEY + b * Nblk + n, mask=ok, other=0) != 0)
        ld = ok[None, :] & d_ok[:, None]
        if MINMAX:
            lo_t = tl.load(s_base + n[None, :] * ssn + d[:, None] * ssd, mask=ld, other=0.0).to(tl.float32)
            hi_t = tl.load(s_base + n[None, :] * ssn + ssr + d[:, None] * ssd, mask=ld, other=0.0).to(tl.float32)
            sc = tl.dot(q_pos, hi_t, input_precision="ieee") + tl.dot(q_neg, lo_t, input_precision="ieee")
        else:
            mean_t = tl.load(s_base + n[None, :] * ssn + d[:, None] * ssd, mask=ld, other=0.0).to(tl.float32)
            sc = tl.dot(q, mean_t, input_precision="ieee")
        sc = tl.where(row_ok[:, None], sc, float("-inf"))
        pooled = tl.max(sc, axis=0) + 0.0  # [BLOCK_N]; + 0.0 turns -0.0 into +0.0, as torch.topk ranks them
        # A NaN or infinite score (0 * inf in a min/max bound) is not a candidate, as in naive.py.
        ok = ok & (pooled == pooled) & (tl.abs(pooled) < float("inf"))
        # Order-preserving int32 of a float: negative floats have their magnitude bits flipped.
        bits = pooled.to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = (bits.to(tl.int64) << 32) | (2147483647 - n).to(tl.int64)
        key = tl.where(ok, key, _NO_BLOCK)
        cand = tl.topk(key, KP)
        best = tl.topk(tl.reshape(tl.join(best, cand), [2 * KP]), KP)
    out = KEYS + ((bh.to(tl.int64) * num_qb + j) * SPLITS + split) * KP + tl.arange(0, KP)
    tl.store(out, best)


def topk_num_stages(block_n: int, d: int, kind: str) -> int:
    """Software-pipeline depth: one summary tile per stage is ``block_n x D`` fp32 (twice for min/max), so deep
    pipelines of wide tiles would not fit in shared memory."""
    return 1 if block_n * d * (2 if kind == "minmax" else 1) * 4 > 64 * 1024 else 2


def block_topk_triton(
    q: Tensor,
    summaries: Tensor,
    kind: str,
    top_k: int,
    query_block_size: int,
    limit: Tensor,
    sink_lo: Tensor,
    sink_hi: Tensor,
    has_key: Tensor | None = None,
) -> Tensor:
    """Same signature and contract as :func:`~longattn.ops.block_topk.naive.block_topk_naive`:
    ``q [B, Hq, Tq, D]``, ``summaries [B, Hkv, Nblk, R, D]`` -> ``[B, Hq, Qblk, top_k]`` int32, best first."""
    return block_topk_launch(q, summaries, kind, top_k, query_block_size, limit, sink_lo, sink_hi, has_key)


def block_topk_launch(
    q: Tensor,
    summaries: Tensor,
    kind: str,
    top_k: int,
    query_block_size: int,
    limit: Tensor,
    sink_lo: Tensor,
    sink_hi: Tensor,
    has_key: Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """:func:`block_topk_triton` with the launch geometry exposed (tests force splits and tile widths)."""
    check_topk_inputs(q, summaries, kind, top_k, query_block_size, limit, sink_lo, sink_hi, has_key)
    check_triton_runs(q.device.type)
    b, hq, tq, d = q.shape
    hkv, nkb = summaries.shape[1], summaries.shape[2]
    qbs = query_block_size
    nqb = -(-tq // qbs)
    kp = triton.next_power_of_2(top_k)
    if block_n is None:
        block_n = max(64, kp)
    if block_n < max(16, kp) or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= max(16, next_pow2(top_k)={kp}), got {block_n}")
    if num_splits is None:
        # Decode scans every block for one query: split the blocks so that the GPU fills.
        num_splits = fill_splits(nqb * b * hq, -(-nkb // block_n), q.device)
    per_split = -(-nkb // num_splits)
    keys = torch.empty((b, hq, nqb, num_splits, kp), dtype=torch.int64, device=q.device)
    has = kernel_flags(has_key, q)
    _block_topk_kernel[(nqb, b * hq, num_splits)](
        q, summaries, keys, limit.to(torch.int32).contiguous(), sink_lo.to(torch.int32).contiguous(),
        sink_hi.to(torch.int32).contiguous(), has,
        *q.stride(), *summaries.stride(),
        tq, nkb, per_split, hq, nqb,
        G=hq // hkv, QBS=qbs, D=d, KP=kp, SPLITS=num_splits,
        BLOCK_M=dot_tile(qbs), BLOCK_N=block_n, BLOCK_D=dot_tile(d),
        MINMAX=kind == "minmax", HAS_MASK=has_key is not None,
        num_stages=topk_num_stages(block_n, d, kind),
    )
    keys = keys.view(b, hq, nqb, num_splits * kp)
    if num_splits > 1 or kp > top_k:
        keys = keys.topk(min(top_k, keys.shape[-1]), dim=-1).values
    ids = (2147483647 - (keys & 0xFFFFFFFF)).to(torch.int32)
    return torch.where(keys != _NO_BLOCK.value, ids, -1)[..., :top_k]
