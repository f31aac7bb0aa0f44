"""Naive block-sparse attention: a hand-computed case, and position policies through gather against it."""

from __future__ import annotations

import math

import pytest
import torch

from longattn.core.positions import InfLLMLayout, LongHeadsLayout, Original, SelfExtend
from longattn.core.reposition import Reposition
from longattn.core.rope import Rope
from longattn.core.selection import Selection
from longattn.ops import block_sparse_attention, block_sparse_attention_gather, block_sparse_attention_naive
from tests.ops.common import assert_matches_naive, case_id, make_qkv, rel_rms

D = 16
INV_FREQ = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def test_one_row_by_hand():
    # Query 2 of 4 (position 2), block size 2, selecting block 0 only: it sees keys 0 and 1.
    q, k, v = make_qkv(1, 1, 1, 4, 4, 8, seed=3)
    sel = Selection(torch.tensor([[[[0], [0]]]], dtype=torch.int32), torch.ones(1, 1, 2, dtype=torch.int32), 2, 2)
    out, lse = block_sparse_attention_naive(q, k, v, sel, scale=0.5)
    scores = (q[0, 0, 2] @ k[0, 0, :2].T) * 0.5
    torch.testing.assert_close(out[0, 0, 2], torch.softmax(scores, 0) @ v[0, 0, :2])
    torch.testing.assert_close(lse[0, 0, 2], torch.logsumexp(scores, 0))
    # Query 0 sees key 0 only; without causality it sees both keys of the block.
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])
    free, _ = block_sparse_attention_naive(q, k, v, sel, scale=0.5, causal=False)
    torch.testing.assert_close(free[0, 0, 0], torch.softmax(q[0, 0, 0] @ k[0, 0, :2].T * 0.5, 0) @ v[0, 0, :2])


def test_output_dtype_and_default_scale():
    q, k, v = make_qkv(1, 2, 1, 16, 16, 8, torch.bfloat16)
    sel = Selection.from_mask(torch.ones(1, 2, 1, 1, dtype=torch.bool), 16, 16)
    out, lse = block_sparse_attention_naive(q, k, v, sel)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    same, _ = block_sparse_attention_naive(q, k, v, sel, scale=1 / math.sqrt(8))
    assert torch.equal(out, same)


def _windowed_selection(b, h, tq, tk, qbs, bs, window, keep, seed, q_offset):
    """Sinks + local window + random earlier blocks per query block (what a method with a window selects)."""
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-tq // qbs), -(-tk // bs)
    mask = torch.rand(b, h, nqb, nkb, generator=g) < keep
    for j in range(nqb):
        first, last = q_offset + j * qbs, q_offset + min((j + 1) * qbs, tq) - 1
        lo = min(max(first - window, 0) // bs, first // bs)
        mask[..., j, lo: last // bs + 1] = True
        mask[..., j, 0] = True
        mask[..., j, last // bs + 1:] = False
    return Selection.from_mask(mask, qbs, bs)


# (B, Hq, Hkv, Tq, Tk, D, bs, qbs, q_offset)
REPOSITION_CASES = [
    (1, 4, 2, 100, 100, D, 8, 8, None),
    (2, 4, 1, 70, 200, D, 16, 16, None),  # chunked prefill
    (1, 2, 2, 30, 150, D, 8, 4, 60),  # queries in the middle
    (2, 8, 2, 1, 333, D, 16, 1, None),  # decode
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padded", [False, True], ids=["all-keys", "padded"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-q-head", "per-kv-head"])
@pytest.mark.parametrize("policy", [Original(), LongHeadsLayout(), InfLLMLayout(), SelfExtend(4)], ids=lambda p: p.name)
@pytest.mark.parametrize("case", REPOSITION_CASES, ids=[case_id(*c[:8], q_offset=c[8]) for c in REPOSITION_CASES])
def test_gather_repositions_like_naive(case, policy, shared, padded, dtype):
    b, hq, hkv, tq, tk, d, bs, qbs, q_offset = case
    offset = tk - tq if q_offset is None else q_offset
    q, k, v = make_qkv(b, hq, hkv, tq, tk, d, dtype, seed=tk)
    sel = _windowed_selection(b, hkv if shared else hq, tq, tk, qbs, bs, 24, 0.3, seed=tq, q_offset=offset)
    key_mask = None
    if padded:
        key_mask = torch.ones(b, tk, dtype=torch.bool)
        key_mask[-1, :13] = False  # left padding of the last row
    plan = Reposition(policy, Rope(INV_FREQ, 10_000), 24)
    kwargs = dict(key_mask=key_mask, q_offset=q_offset, reposition=plan)
    out, lse = block_sparse_attention_gather(q, k, v, sel, **kwargs)
    ref, ref_lse = block_sparse_attention_naive(q, k, v, sel, **kwargs)
    # bf16: gather rotates keys in the input dtype, naive in float32.
    fp32 = dtype == torch.float32
    assert_matches_naive(out, lse, ref, ref_lse, 1e-5 if fp32 else 2e-2, 2e-3 if fp32 else 5e-2)
    if policy.changes_positions and not isinstance(policy, LongHeadsLayout):
        plain, _ = block_sparse_attention_naive(q, k, v, sel, key_mask=key_mask, q_offset=q_offset)
        assert rel_rms(ref, plain) > 1e-3  # the policy really moved far keys


def test_reposition_needs_causal_and_dispatches_to_naive():
    q, k, v = make_qkv(1, 2, 1, 32, 32, D)
    sel = Selection.from_mask(torch.ones(1, 2, 2, 2, dtype=torch.bool).tril(), 16, 16)
    plan = Reposition(InfLLMLayout(), Rope(INV_FREQ, 4096), 0)
    with pytest.raises(ValueError, match="needs causal=True"):
        block_sparse_attention_naive(q, k, v, sel, causal=False, reposition=plan)
    a, _ = block_sparse_attention(q, k, v, sel, reposition=plan, backend="naive")
    b, _ = block_sparse_attention_naive(q, k, v, sel, reposition=plan)
    assert torch.equal(a, b)
