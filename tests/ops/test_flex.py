"""The FlexAttention backend: Selection -> BlockMask, and its attention against naive.

On CPU FlexAttention runs eagerly (small shapes, a cross-check of the mask); on CUDA it is compiled.
"""

from __future__ import annotations

import pytest
import torch

from longattn.core.selection import Selection
from longattn.ops import block_sparse_attention, block_sparse_attention_naive, resolve_backend
from longattn.ops.block_sparse.flex import (
    block_sparse_attention_flex,
    flex_available,
    rows_without_keys,
    selection_block_mask,
)
from tests.ops.common import assert_matches_naive, make_qkv, rel_rms
from tests.ops.gpu_helpers import DEVICE, HAS_CUDA, requires_cuda, shape_id

pytestmark = pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention BlockMask.from_kv_blocks")

SHAPES = [  # (B, Hq, Hkv, Tq, Tk, D, bs, qbs)
    (1, 4, 2, 64, 64, 16, 16, 16),
    (2, 8, 2, 100, 100, 32, 16, 32),
    (1, 4, 2, 70, 333, 64, 32, 16),
    (1, 8, 2, 1, 1000, 64, 64, 1),
]


def _selection(b, h, tq, tk, bs, qbs, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, -(-tq // qbs), -(-tk // bs), generator=g) < density
    return Selection.from_mask(mask.to(DEVICE), qbs, bs)


@pytest.mark.parametrize("padded", [False, True], ids=["dense-keys", "padded"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-q-head", "per-kv-head"])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(*s[:7]) for s in SHAPES])
def test_flex_matches_naive(shape, shared, padded):
    b, hq, hkv, tq, tk, d, bs, qbs = shape
    dtype = torch.float16 if HAS_CUDA else torch.float32
    q, k, v = (t.to(DEVICE) for t in make_qkv(b, hq, hkv, tq, tk, d, dtype, seed=1))
    sel = _selection(b, hkv if shared else hq, tq, tk, bs, qbs, 0.3, seed=2)
    km = (torch.rand(b, tk, generator=torch.Generator().manual_seed(3)) < 0.7).to(DEVICE) if padded else None
    out, lse = block_sparse_attention_flex(q, k, v, sel, key_mask=km)
    ref, ref_lse = block_sparse_attention_naive(q, k, v, sel, key_mask=km)
    assert_matches_naive(out, lse, ref, ref_lse, 5e-3 if HAS_CUDA else 1e-5)


def test_block_mask_lists_exactly_the_selection_and_full_blocks_are_fully_visible():
    b, hq, tq, tk, bs, qbs = 2, 4, 96, 200, 16, 32
    sel = _selection(b, hq, tq, tk, bs, qbs, 0.5, seed=4)
    offset = tk - tq
    km = torch.ones(b, tk, dtype=torch.bool, device=DEVICE)
    km[1, :20] = False  # left padding: blocks 0 and 1 of row 1 are not whole
    mask = selection_block_mask(sel, tq, tk, hq, offset, key_mask=km)
    nkb = -(-tk // bs)
    listed = mask.to_dense().bool()  # partial + full blocks
    assert torch.equal(listed[..., :nkb], sel.to_mask(nkb))
    # Full blocks skip mask_mod in the fused kernel: every pair in them must be visible.
    full = torch.zeros_like(listed)
    fn, fi = mask.full_kv_num_blocks, mask.full_kv_indices
    slots = torch.arange(fi.shape[-1], device=DEVICE) < fn.unsqueeze(-1)
    full.scatter_(-1, torch.where(slots, fi.long(), 0), slots)
    assert full.any() and not bool((full & ~listed).any())
    rows = offset + torch.arange(tq, device=DEVICE)
    for bi, h, j, n in full.nonzero().tolist():
        keys = torch.arange(n * bs, (n + 1) * bs, device=DEVICE)
        qs = rows[j * qbs:(j + 1) * qbs]
        assert bool((keys.max() <= qs.min()) and (keys < tk).all() and km[bi, keys].all())


def test_rows_without_keys():
    # Query block 0 selects only a block after its queries; block 1 selects a block of padding only.
    tq = tk = 32
    idx = torch.tensor([[[[1], [0]]]], dtype=torch.int32, device=DEVICE)
    sel = Selection(idx, torch.ones(1, 1, 2, dtype=torch.int32, device=DEVICE), 16, 16)
    km = torch.ones(1, tk, dtype=torch.bool, device=DEVICE)
    km[0, :16] = False
    empty = rows_without_keys(sel, tq, tk, 0, True, km)
    assert bool(empty.all())
    assert not bool(rows_without_keys(sel, tq, tk, 0, True, None)[0, 0, 16:].any())
    assert not bool(rows_without_keys(sel, tq, tk, 0, False, None).any())


def test_dispatch_refuses_flex_on_cpu():
    with pytest.raises(ValueError, match="backend='flex' runs compiled on CUDA"):
        resolve_backend("flex", "cpu")
    q, k, v = make_qkv(1, 2, 1, 16, 16, 16)
    sel = Selection.from_mask(torch.ones(1, 2, 1, 1, dtype=torch.bool), 16, 16)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="flex"):
            block_sparse_attention(q, k, v, sel, backend="flex")


@requires_cuda
@pytest.mark.parametrize("bs", [16, 64, 128])
def test_flex_full_size_on_gpu(bs):
    b, hq, hkv, t, d = 1, 32, 8, 4096, 128
    q, k, v = (x.cuda() for x in make_qkv(b, hq, hkv, t, t, d, torch.bfloat16, seed=5))
    sel = _selection(b, hkv, t, t, bs, 64, 0.1, seed=6)
    out, lse = block_sparse_attention(q, k, v, sel, backend="flex")
    ref, ref_lse = block_sparse_attention_naive(q, k, v, sel)
    ok = torch.isfinite(ref_lse)
    assert rel_rms(out[ok], ref[ok]) < 2e-2
