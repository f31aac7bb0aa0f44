"""Triton backend: block-sparse flash attention over a Selection, prefill and decode in one kernel.

One program owns one tile of query rows of one query block and one selection head. Its selected key blocks
are read as one virtual sequence of ``count * kv_block_size`` keys and walked in tiles of ``BLOCK_N`` keys, so
several small blocks (16 keys) fill one tile and a large block (128 keys) spans several: any block size runs at
full tile width. Keys are loaded straight from ``k``/``v`` by index (no gathered copy, no repeat for GQA):
when one selection serves a GQA group, the group's query heads are rows of the same tile and share every
key load.

Decode (few query rows, many keys) splits each row's selected tiles across ``num_splits`` programs (split-K);
each writes a partial ``(out, lse)`` and a second kernel merges them by log-sum-exp.

Triton reads ``TRITON_INTERPRET`` when this module is imported: with ``TRITON_INTERPRET=1`` the kernels run in
Triton's CPU interpreter (slow; how CI tests them), otherwise they compile for CUDA.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from longattn.core.selection import Selection
from longattn.ops.block_sparse.checks import check_inputs
from longattn.ops.triton_utils import check_triton_runs, dot_tile, fill_splits, interpreter_requested, kernel_flags

LOG2E = 1.4426950408889634

# Read at import, when the @triton.jit kernels below make their own compile-or-interpret choice.
INTERPRETED = interpreter_requested()


@triton.jit
def _sparse_attn_fwd(
    Q, K, V, O, LSE, IDX, CNT, KVALID,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sob, soh, sot, sod, sos,
    slb, slh, slt, sls,
    sib, sih, siq, sis,
    scb, sch, scq,
    Tq, Tk, q_offset, num_hs, row_tiles, tiles_per_split, sm_scale_log2,
    HPS: tl.constexpr, SPK: tl.constexpr, QBS: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KVALID: tl.constexpr, IEEE: tl.constexpr,
):
    pid0 = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    qblk = pid0 // row_tiles
    rtile = pid0 % row_tiles
    # Offsets in int64: a 1M-token cache of 8 heads x 128 dims per batch row already spans 2^30 elements.
    b = (bh // num_hs).to(tl.int64)
    hs = bh % num_hs
    kvh = (hs // SPK).to(tl.int64)

    # Rows of this selection head: HPS query heads x QBS tokens of the query block.
    r = rtile * BLOCK_M + tl.arange(0, BLOCK_M)
    head = (hs * HPS + r // QBS).to(tl.int64)
    tok = (qblk * QBS + r % QBS).to(tl.int64)
    row_ok = (r < HPS * QBS) & (tok < Tq)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_ptr = Q + b * sqb + head[:, None] * sqh + tok[:, None] * sqt + d[None, :] * sqd
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if CAUSAL:
        row_pos = q_offset + tok
    else:
        row_pos = tok * 0 + Tk

    n_sel = tl.load(CNT + b * scb + hs * sch + qblk * scq)
    n_tiles = tl.cdiv(n_sel * BS, BLOCK_N)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, n_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    idx_base = IDX + b * sib + hs * sih + qblk * siq
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    for t in range(first_tile, last_tile):
        # Virtual key u of the concatenated selected blocks -> slot u // BS, token u % BS of that block.
        u = t * BLOCK_N + tl.arange(0, BLOCK_N)
        slot = u // BS
        u_ok = slot < n_sel
        blk = tl.load(idx_base + slot * sis, mask=u_ok, other=0)
        kpos = blk.to(tl.int64) * BS + u % BS
        u_ok = u_ok & (kpos < Tk)
        if HAS_KVALID:
            u_ok = u_ok & (tl.load(KVALID + b * Tk + kpos, mask=u_ok, other=0) != 0)
        kt = tl.load(k_base + kpos[None, :] * skt + d[:, None] * skd, mask=u_ok[None, :] & d_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * sm_scale_log2
        visible = u_ok[None, :] & (kpos[None, :] <= row_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows that have seen no key yet shift by 0, so exp2(-inf) stays 0 instead of NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + kpos[:, None] * svt + d[None, :] * svd, mask=u_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    o_ptr = O + b * sob + head[:, None] * soh + tok[:, None] * sot + split.to(tl.int64) * sos + d[None, :] * sod
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * slb + head * slh + tok * slt + split.to(tl.int64) * sls, lse, mask=row_ok)


@triton.jit
def _merge_splits(
    PO, PLSE, O, LSE, rows, num_splits,
    SPLITS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Partials are [rows, splits, D] / [rows, splits] (contiguous); out is [rows, D], lse [rows].
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    lse = tl.load(PLSE + row * num_splits + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    total = tl.sum(w, axis=0)
    part = tl.load(PO + (row * num_splits + s[:, None]) * D + d[None, :], mask=s_ok[:, None] & (d[None, :] < D), other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(O + row * D + d, out.to(O.dtype.element_ty), mask=d < D)
    tl.store(LSE + row, tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf")))


def tile_config(rows: int, block_d: int, ieee: bool) -> dict[str, int]:
    """Tile sizes and launch settings of the attention kernel for ``rows`` query rows per query block.

    FlashAttention-2's forward choices (128 x 64 tiles, 8 warps at D=128), smaller for fp32 and D > 128 so the
    tiles fit in shared memory; not tuned on our gathered loads (docs/results/gpu.md). Decode-like calls get
    16-row tiles, the least ``tl.dot`` takes.
    """
    block_m = min(64 if ieee or block_d > 128 else 128, dot_tile(rows))
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": 32 if ieee or block_d > 128 else 64,
        "num_warps": 8 if block_m * block_d >= 128 * 128 else 4,
        "num_stages": 2 if block_d > 128 else 3,
    }


def default_num_splits(q_rows: int, programs: int, max_tiles: int, device: torch.device) -> int:
    """Splits per row tile for decode-like calls (:func:`fill_splits`); prefill (more than 16 query rows) gets
    1: its query blocks already fill the GPU, and splits would cost fp32 partials per row."""
    return 1 if q_rows > 16 else fill_splits(programs, max_tiles, device)


def block_sparse_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    scale: float | None = None,
    *,
    causal: bool = True,
    key_mask: Tensor | None = None,
    q_offset: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Same signature and contract as :func:`~longattn.ops.block_sparse.naive.block_sparse_attention_naive`
    (without ``reposition``).

    ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]`` (any strides: a cache view is read in place), selection
    ``[B, H, Qblk, S]`` -> ``out [B, Hq, Tq, D]`` in q's dtype, ``lse [B, Hq, Tq]`` float32.
    """
    return sparse_attention_launch(q, k, v, selection, scale, causal=causal, key_mask=key_mask, q_offset=q_offset)


def sparse_attention_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    scale: float | None = None,
    *,
    causal: bool = True,
    key_mask: Tensor | None = None,
    q_offset: int | None = None,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`block_sparse_attention_triton` with the launch geometry exposed (tests force split-K and tiles).

    Args:
        num_splits: programs sharing one row tile's key tiles (split-K); default: >1 only for decode-like calls.
        block_m, block_n: query rows / keys per tile (powers of two, >= 16).
    """
    offset = check_inputs(q, k, v, selection, key_mask, q_offset)
    check_triton_runs(q.device.type)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if d > 256:
        raise ValueError(f"backend='triton' supports head dims up to 256, got D={d}")
    hs = selection.num_heads
    hps, spk = hq // hs, hs // hkv
    bs, qbs = selection.kv_block_size, selection.query_block_size
    nqb, width = selection.num_q_blocks, selection.indices.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = hps * qbs
    block_d = dot_tile(d)
    # fp32 inputs get exact fp32 dots (not TF32). The interpreter computes bf16 arithmetic on raw bits, so
    # there bf16 tiles are upcast too: the same math, slower.
    ieee = q.dtype == torch.float32 or (INTERPRETED and q.dtype == torch.bfloat16)
    tiles = tile_config(rows, block_d, ieee)
    block_m = tiles["BLOCK_M"] if block_m is None else block_m
    block_n = tiles["BLOCK_N"] if block_n is None else block_n
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {val}")
    row_tiles = -(-rows // block_m)
    max_tiles = -(-width * bs // block_n)
    if num_splits is None:
        num_splits = default_num_splits(qbs * nqb, b * hs * nqb * row_tiles, max_tiles, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    tiles_per_split = max(1, -(-max_tiles // num_splits))

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    if num_splits == 1:
        o_buf, l_buf = out, lse
        o_strides = (*out.stride(), 0)  # (b, h, t, d, split)
        l_strides = (*lse.stride(), 0)  # (b, h, t, split)
    else:
        o_buf = torch.empty((b, hq, tq, num_splits, d), dtype=torch.float32, device=q.device)
        l_buf = torch.empty((b, hq, tq, num_splits), dtype=torch.float32, device=q.device)
        o_strides = (o_buf.stride(0), o_buf.stride(1), o_buf.stride(2), o_buf.stride(4), o_buf.stride(3))
        l_strides = l_buf.stride()
    kvalid = kernel_flags(key_mask, q)
    idx, cnt = selection.indices, selection.counts
    grid = (nqb * row_tiles, b * hs, num_splits)
    _sparse_attn_fwd[grid](
        q, k, v, o_buf, l_buf, idx, cnt, kvalid,
        *q.stride(), *k.stride(), *v.stride(),
        *o_strides, *l_strides,
        *idx.stride(), *cnt.stride(),
        tq, tk, offset, hs, row_tiles, tiles_per_split, scale * LOG2E,
        HPS=hps, SPK=spk, QBS=qbs, BS=bs, D=d,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        CAUSAL=causal, HAS_KVALID=key_mask is not None, IEEE=ieee,
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )
    if num_splits > 1:
        _merge_splits[(b * hq * tq,)](
            o_buf, l_buf, out, lse, b * hq * tq, num_splits,
            SPLITS=triton.next_power_of_2(num_splits), D=d, BLOCK_D=block_d,
        )
    return out, lse
