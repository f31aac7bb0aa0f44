"""BlockMax: a block scores as its best key against the query block's mean query."""

from __future__ import annotations

import torch

import longattn
from longattn.methods import SelectionContext
from tests.methods.helpers import select
from tests.methods.test_quality_options import _hidden_key_case


def test_scores_equal_a_loop_over_blocks_and_keys():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 52, 8)
    m = longattn.get_method("blockmax", block_size=8, query_block_size=8)
    mask = torch.ones(1, 52, dtype=torch.bool)
    mask[0, :3] = False  # left padding: never a block's best key
    ctx = SelectionContext(kv_len=52, q_offset=32, layer=0, num_kv_heads=2, keys=k, key_mask=mask)
    got = m.block_scores(q, None, ctx, 8)
    want = torch.empty(1, 4, 3, 7)
    for h in range(4):
        for qb in range(3):
            qm = q[0, h, qb * 8 : (qb + 1) * 8].mean(0)
            for j in range(7):
                keys = [t for t in range(j * 8, min(52, (j + 1) * 8)) if mask[0, t]]
                visible = j <= (32 + min(20, (qb + 1) * 8) - 1) // 8  # some query of the block sees block j
                want[0, h, qb, j] = max(float(qm @ k[0, h // 2, t]) for t in keys) if visible else float("-inf")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_scores_equal_the_one_product_reference():
    from longattn.methods.blockmax import pooled_max_scores, pooled_max_scores_reference

    torch.manual_seed(3)
    mean_q, k = torch.randn(2, 6, 9, 16), torch.randn(2, 3, 130, 16)
    causal_hi = torch.tensor([0, 1, 3, 3, 5, 8, 8, 12, 16])  # non-decreasing, the last block seen by all
    mask = torch.ones(2, 130, dtype=torch.bool)
    mask[1, :21] = False  # left padding of the second row: blocks 0 and 1 all padding, block 2 partly
    want = pooled_max_scores_reference(mean_q, k, 8, causal_hi, mask)
    for chunk in (1, 6 * 130, 6 * 130 * 4, 1 << 23):  # one query block per chunk, two rows of 1, ..., all at once
        torch.testing.assert_close(pooled_max_scores(mean_q, k, 8, causal_hi, mask, chunk), want)
    assert torch.isinf(want[1, :, :, :2]).all() and torch.isfinite(want[1, :, 2:, 2]).all()


def test_finds_the_block_whose_best_key_matches_where_the_mean_key_misses_it():
    q, k = _hidden_key_case()
    base = dict(block_size=16, window=16, sink_tokens=0, top_k=1, query_block_size=16)
    moba = select(longattn.get_method("moba", **base), q, k).indices[0, 0, -1].tolist()
    found = select(longattn.get_method("blockmax", **base), q, k).indices[0, 0, -1].tolist()
    assert 4 not in moba and 4 in found


def _decode_scores(rank, k, q1, steps=3):
    m = longattn.get_method("blockmax", block_size=8, decode_rank=rank)
    memory: dict = {}
    prompt = k[:, :, :40]
    ctx = SelectionContext(kv_len=40, q_offset=0, layer=0, num_kv_heads=2, keys=prompt, memory=memory)
    m.block_scores(torch.randn(1, 4, 40, 8), None, ctx, 8)  # the prompt: the sketch is made here
    out = []
    for t in range(41, 41 + steps):  # keys arrive one by one, each projected once
        ctx = SelectionContext(kv_len=t, q_offset=t - 1, layer=0, num_kv_heads=2, keys=k[:, :, :t], memory=memory)
        out.append(m.block_scores(q1, None, ctx, 1))
    return out


def test_decode_in_a_full_rank_sketch_equals_exact_scores_and_a_low_rank_one_differs():
    torch.manual_seed(1)
    k, q1 = torch.randn(1, 2, 60, 8), torch.randn(1, 4, 1, 8)
    exact = _decode_scores(None, k, q1)
    full = _decode_scores(8, k, q1)
    low = _decode_scores(2, k, q1)
    for e, f, lo in zip(exact, full, low):
        torch.testing.assert_close(f, e, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(lo, e, atol=1e-2)
