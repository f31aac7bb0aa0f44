"""Attention over block summaries (the compensation of unselected blocks) against its reference."""

from __future__ import annotations

import pytest
import torch

from longattn.core.selection import Selection
from longattn.ops import block_sparse_attention, dense_attention, merge_attention
from longattn.ops.summary_attention import block_means, summary_attention, summary_attention_naive


def _inputs(b=1, hq=4, hkv=2, tq=24, tk=80, d=8, bs=8, qbs=4, heads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g)
    v = torch.randn(b, hkv, tk, d, generator=g)
    nkb, nqb = -(-tk // bs), -(-tq // qbs)
    hs = heads or hq
    # A random selection per query block, -1 padded.
    scores = torch.rand(b, hs, nqb, nkb, generator=g)
    ids = scores.topk(3, dim=-1).indices.sort(-1).values.int()
    ids[..., -1] = torch.where(torch.rand(b, hs, nqb, generator=g) < 0.3, -1, ids[..., -1])
    return q, k, v, ids


@pytest.mark.parametrize("heads, qbs, q_offset_from_end", [(None, 4, True), (2, 4, True), (None, 1, True), (None, 8, False)])
def test_fast_path_equals_the_reference(heads, qbs, q_offset_from_end):
    q, k, v, ids = _inputs(heads=heads, qbs=qbs)
    km, counts = block_means(k, 8)
    vm, _ = block_means(v, 8)
    counts[0, 3] = 0  # a block of padding only never enters
    offset = k.shape[2] - q.shape[2] if q_offset_from_end else 6
    got = summary_attention(q, km, vm, counts, ids, qbs, 8, offset, 0.3)
    want = summary_attention_naive(q, km, vm, counts, ids, qbs, 8, offset, 0.3)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got[1]).any()
    if not q_offset_from_end:
        assert torch.isinf(got[1][:, :, 0]).all()  # row 0 at position 6 sees no whole block


def test_chunks_of_rows_give_the_same_result(monkeypatch):
    q, k, v, ids = _inputs(tq=32, tk=96, qbs=4)
    km, counts = block_means(k, 8)
    vm, _ = block_means(v, 8)
    whole = summary_attention(q, km, vm, counts, ids, 4, 8, 64, 0.3)
    monkeypatch.setattr("longattn.ops.summary_attention._CHUNK_ELEMENTS", 4 * 12 * 4)
    chunked = summary_attention(q, km, vm, counts, ids, 4, 8, 64, 0.3)
    torch.testing.assert_close(whole, chunked)


def test_summary_tokens_are_exact_where_each_block_holds_one_key_repeated():
    """Where every key (and value) of a block is the same, the block's token is the block: selection plus
    compensation then equals dense attention, whatever the selection left out."""
    b, h, tk, d, bs = 1, 2, 64, 8, 8
    g = torch.Generator().manual_seed(1)
    k = torch.randn(b, h, tk // bs, 1, d, generator=g).expand(-1, -1, -1, bs, -1).reshape(b, h, tk, d)
    v = torch.randn(b, h, tk // bs, 1, d, generator=g).expand(-1, -1, -1, bs, -1).reshape(b, h, tk, d)
    q = torch.randn(b, h, 16, d, generator=g)
    qbs, offset, nqb = 16, tk - 16, 1
    # Sinks (block 0) and the diagonal blocks only: blocks 1..5 are left out.
    ids = torch.tensor([0, 6, 7], dtype=torch.int32).view(1, 1, 1, 3).expand(b, h, nqb, 3).contiguous()
    sel = Selection(ids, torch.full((b, h, nqb), 3, dtype=torch.int32), qbs, bs)
    out, lse = block_sparse_attention(q, k, v, sel, 0.5, causal=True)
    km, counts = block_means(k, bs)
    vm, _ = block_means(v, bs)
    out_c, lse_c = summary_attention(q, km, vm, counts, ids, qbs, bs, offset, 0.5)
    merged, _ = merge_attention(out, lse, out_c, lse_c)
    dense = dense_attention(q, k, v, 0.5)
    assert not torch.allclose(out, dense, atol=1e-3)
    torch.testing.assert_close(merged, dense, atol=1e-5, rtol=1e-5)


def test_block_means_skip_padding():
    x = torch.arange(2 * 1 * 6 * 1, dtype=torch.float32).view(2, 1, 6, 1)
    mask = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    means, counts = block_means(x, 4, mask)
    assert counts.tolist() == [[3, 2], [4, 2]]
    assert means[0, 0, :, 0].tolist() == [2.0, 4.5]  # (1 + 2 + 3) / 3, (4 + 5) / 2


def test_bad_shapes_are_refused():
    q, k, v, ids = _inputs()
    km, counts = block_means(k, 8)
    vm, _ = block_means(v, 8)
    with pytest.raises(ValueError, match="selected"):
        summary_attention(q, km, vm, counts, ids.float(), 4, 8, 56, 0.3)
    with pytest.raises(ValueError, match="counts"):
        summary_attention(q, km, vm, counts[:, :-1], ids, 4, 8, 56, 0.3)
