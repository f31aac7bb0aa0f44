"""FlexAttention backend: a Selection becomes a ``BlockMask`` (``BlockMask.from_kv_blocks``, the same layout)
and ``flex_attention`` computes it: a second fast path on CUDA and a cross-check of the Triton kernel.

On CUDA ``flex_attention`` is compiled (one fused kernel that skips unselected blocks). On CPU it runs eagerly,
which materialises the full score matrix: there it is a small-input cross-check only, and the dispatcher
refuses ``backend="flex"`` on CPU tensors.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from longattn.core.selection import Selection
from longattn.ops.block_sparse.checks import check_inputs


def flex_available() -> bool:
    """Whether this torch has FlexAttention with ``BlockMask.from_kv_blocks``."""
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError:
        return False
    return hasattr(BlockMask, "from_kv_blocks")


@functools.cache
def _compiled_flex() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    # One compiled callable per process. Dynamic shapes: decode grows the cache by one key per step, and a
    # static compile would recompile every step until dynamo gives up and runs eagerly.
    return torch.compile(flex_attention, dynamic=True)


def selection_block_mask(
    selection: Selection, q_len: int, kv_len: int, num_q_heads: int, q_offset: int, causal: bool = True,
    key_mask: Tensor | None = None, exact_mask_mod: bool = True,
) -> Any:
    """The ``BlockMask`` of ``selection`` ``[B, H, Qblk, S]`` for queries ``[.., q_len, ..]`` at ``q_offset``.

    Heads shared by a GQA group are expanded to ``num_q_heads`` (indices only, no K/V). Selected blocks that
    every row of the query block may see entirely are passed as *full* blocks (the fused kernel skips the
    mask there); the rest as partial blocks whose ``mask_mod`` keeps causality (``q_offset + q >= k``), keys
    before ``kv_len`` and ``key_mask`` ``[B, Tk]``.

    Args:
        exact_mask_mod: also test block membership inside ``mask_mod`` (a ``[B, Hq, Qblk, Nblk]`` bool lookup,
            block-level, read only in partial blocks by the fused kernel). Eager ``flex_attention`` evaluates
            ``mask_mod`` on every pair and ignores the block lists, and torch.compile falls back to eager when
            it hits its recompile limit, so without it a fallback would silently compute dense attention.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bs, qbs = selection.kv_block_size, selection.query_block_size
    idx, cnt = selection.indices, selection.counts
    if idx.shape[2] == 1:
        # One query block (decode, short chunks): any block height >= q_len means the same; a power of two
        # >= 16 is one the fused kernels accept.
        qbs = max(16, 1 << max(0, q_len - 1).bit_length())
    if idx.shape[1] != num_q_heads:
        rep = num_q_heads // idx.shape[1]
        idx, cnt = idx.repeat_interleave(rep, dim=1), cnt.repeat_interleave(rep, dim=1)
    b, h, nqb, width = idx.shape
    nkb = -(-kv_len // bs)
    dev = idx.device
    blk = idx.long()
    valid = blk >= 0
    # A block is full for a query block when its last key precedes the block's first query and it is whole.
    first_row = (q_offset + torch.arange(nqb, device=dev) * qbs).view(1, 1, nqb, 1)
    whole = (blk + 1) * bs <= kv_len
    full = valid & whole & (((blk + 1) * bs - 1 <= first_row) if causal else True)
    if key_mask is not None:
        padded = torch.nn.functional.pad(key_mask, (0, nkb * bs - kv_len), value=False)
        all_valid = padded.view(b, nkb, bs).all(-1)  # [B, Nblk]
        full = full & all_valid.gather(1, blk.clamp(min=0).flatten(1)).view(blk.shape)
    partial = valid & ~full

    def packed(keep: Tensor) -> tuple[Tensor, Tensor]:
        # Kept ids first (stable), the rest after; from_kv_blocks reads [B, H, Qblk, Nblk] index rows.
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
        ids = torch.gather(blk.clamp(min=0), -1, order).to(torch.int32)
        ids = torch.nn.functional.pad(ids, (0, max(0, nkb - width)))[..., :nkb] if width != nkb else ids
        return keep.sum(-1, dtype=torch.int32), ids.contiguous()

    num, ids = packed(partial)
    full_num, full_ids = packed(full)
    member = None
    if exact_mask_mod:
        member = torch.zeros(b, h, nqb, nkb + 1, dtype=torch.bool, device=dev)
        member.scatter_(-1, torch.where(valid, blk, nkb), True)
        member = member[..., :nkb]

    # Lengths as 0-d tensors: closed-over Python ints would be compile-time constants (a recompile per length).
    kv_len_t = torch.tensor(kv_len, device=dev)
    offset_t = torch.tensor(q_offset, device=dev)

    def mask_mod(bi: Tensor, hi: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = kv_idx < kv_len_t
        if causal:
            ok = ok & (q_idx + offset_t >= kv_idx)
        if key_mask is not None:
            ok = ok & key_mask[bi, torch.minimum(kv_idx, kv_len_t - 1)]
        if member is not None:
            ok = ok & member[bi, hi, q_idx // qbs, (kv_idx // bs).clamp(max=nkb - 1)]
        return ok

    return BlockMask.from_kv_blocks(
        num, ids, full_num, full_ids, BLOCK_SIZE=(qbs, bs), mask_mod=mask_mod, seq_lengths=(q_len, kv_len),
    )


def block_sparse_attention_flex(
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

    ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``, selection ``[B, H, Qblk, S]`` -> ``out [B, Hq, Tq, D]``,
    ``lse [B, Hq, Tq]`` float32.
    """
    from torch.nn.attention.flex_attention import flex_attention

    offset = check_inputs(q, k, v, selection, key_mask, q_offset)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    on_gpu = q.device.type == "cuda"
    single = selection.num_q_blocks == 1
    if on_gpu and (selection.kv_block_size < 16 or (selection.query_block_size < 16 and not single)):
        raise ValueError(
            f"backend='flex' needs kv_block_size >= 16 and query_block_size >= 16 (or one query block), got "
            f"kv_block_size={selection.kv_block_size}, query_block_size={selection.query_block_size}; use backend='triton'"
        )
    mask = selection_block_mask(selection, tq, tk, hq, offset, causal, key_mask)
    kwargs: dict[str, Any] = {"block_mask": mask, "scale": scale, "enable_gqa": hq != hkv}
    if on_gpu:
        # The fused kernel's tiles must divide the mask's blocks (small key blocks need small tiles).
        q_tile = mask.BLOCK_SIZE[0]
        kwargs["kernel_options"] = {"BLOCK_M": min(q_tile, 128), "BLOCK_N": min(selection.kv_block_size, 64)}
    try:  # torch >= 2.9 names the extra outputs AuxRequest; older versions take return_lse
        from torch.nn.attention.flex_attention import AuxRequest

        kwargs["return_aux"] = AuxRequest(lse=True)
    except ImportError:
        kwargs["return_lse"] = True
    if on_gpu:
        out, aux = _compiled_flex()(q, k, v, **kwargs)
    else:
        with warnings.catch_warnings():  # the eager path warns that it is unfused; here that is the point
            warnings.simplefilter("ignore")
            out, aux = flex_attention(q, k, v, **kwargs)
    lse = aux.lse if hasattr(aux, "lse") else aux
    # FlexAttention's value for a row that sees no key is not the contract's (out = 0, lse = -inf): set it.
    empty = rows_without_keys(selection, tq, tk, offset, causal, key_mask)
    empty = empty.repeat_interleave(hq // empty.shape[1], dim=1)
    lse = lse.float().masked_fill(empty, float("-inf"))
    return out.masked_fill(empty.unsqueeze(-1), 0.0), lse


def rows_without_keys(
    selection: Selection, q_len: int, kv_len: int, q_offset: int, causal: bool = True, key_mask: Tensor | None = None
) -> Tensor:
    """``[B, H, Tq]`` bool: query rows whose selected blocks hold no key they may see.

    A row sees a key iff the earliest valid key of its selected blocks is at or before it; that minimum is
    one value per query block, so the cost is O(B·H·Qblk·S + B·H·Tq), never per pair.
    """
    bs, qbs = selection.kv_block_size, selection.query_block_size
    idx = selection.indices.long()
    b = idx.shape[0]
    nkb = -(-kv_len // bs)
    big = kv_len + q_offset + q_len + 1
    pos = torch.arange(nkb * bs, device=idx.device)
    first_key = torch.where(pos < kv_len, pos, big).expand(b, -1)
    if key_mask is not None:
        ok = torch.nn.functional.pad(key_mask, (0, nkb * bs - kv_len), value=False)
        first_key = torch.where(ok, first_key, big)
    block_first = first_key.view(b, nkb, bs).amin(-1)  # [B, Nblk]
    per_slot = block_first.gather(1, idx.clamp(min=0).flatten(1)).view(idx.shape)
    per_slot = torch.where(idx >= 0, per_slot, big)
    earliest = per_slot.amin(-1) if per_slot.shape[-1] else torch.full(idx.shape[:3], big, device=idx.device)
    earliest = earliest.repeat_interleave(qbs, dim=2)[:, :, :q_len]  # [B, H, Tq]
    rows = q_offset + torch.arange(q_len, device=idx.device) if causal else torch.full((q_len,), big - 1, device=idx.device)
    return earliest > rows
