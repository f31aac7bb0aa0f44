"""Selection.dense_heads: heads flagged dense run through SDPA inside the operator, with the same output."""

from __future__ import annotations

import pytest
import torch

from longattn.core.positions import Original
from longattn.core.reposition import Reposition
from longattn.core.rope import Rope
from longattn.core.selection import Selection
from longattn.ops import block_sparse_attention, block_sparse_attention_naive, native_available
from tests.ops.common import case_id, make_qkv, rel_rms

D = 16

# (B, Hq, Hkv, Tq, Tk, D, bs, qbs, q_offset, padded)
CASES = [
    (2, 8, 2, 100, 100, D, 16, 16, None, False),  # prefill
    (2, 8, 2, 100, 100, D, 16, 16, None, True),  # left padding
    (1, 6, 3, 40, 150, D, 16, 16, None, False),  # chunked prefill: the last 40 of 150 keys
    (1, 4, 2, 30, 150, D, 16, 8, 50, True),  # queries in the middle (q_offset), padded
    (2, 8, 2, 1, 300, D, 32, 1, None, True),  # decode
    (1, 4, 4, 64, 64, D, 16, 16, None, False),  # no GQA (H = Hq = Hkv)
]
IDS = [case_id(*c[:8], q_offset=c[8]) + ("-pad" if c[9] else "") for c in CASES]


def _inputs(case, shared, dense, seed=0):
    """q, k, v, key_mask and a Selection whose flagged heads list every causal block, the others a random few."""
    b, hq, hkv, tq, tk, d, bs, qbs, q_offset, padded = case
    offset = tk - tq if q_offset is None else q_offset
    q, k, v = make_qkv(b, hq, hkv, tq, tk, d, seed=seed)
    h = hkv if shared else hq
    nqb, nkb = -(-tq // qbs), -(-tk // bs)
    last = offset + torch.clamp((torch.arange(nqb) + 1) * qbs, max=tq) - 1  # last query position of each block
    causal = torch.arange(nkb).view(1, -1) <= (last // bs).view(-1, 1)  # [Qblk, Nblk]
    g = torch.Generator().manual_seed(seed + 1)
    sparse = (torch.rand(b, h, nqb, nkb, generator=g) < 0.3) & causal
    flags = torch.tensor([dense(i, h) for i in range(h)])
    mask = torch.where(flags.view(1, h, 1, 1), causal.expand(b, h, nqb, nkb), sparse)
    key_mask = None
    if padded:
        key_mask = torch.ones(b, tk, dtype=torch.bool)
        key_mask[-1, :37] = False
    return q, k, v, key_mask, q_offset, Selection.from_mask(mask, qbs, bs, dense_heads=flags), flags


PATTERNS = {
    "none": lambda i, h: False,
    "first": lambda i, h: i == 0,
    "alternate": lambda i, h: i % 2 == 1,
    "all": lambda i, h: True,
}


def _query_heads(flags, hq):
    """[Hq] bool: the query heads of the flagged selection heads."""
    return flags.repeat_interleave(hq // flags.shape[0])


@pytest.mark.parametrize("backend", ["gather", "cpu"] + (["native"] if native_available() else []))
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("shared", [False, True], ids=["per-q-head", "per-kv-head"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dense_heads_equal_the_same_selection_without_the_flag(case, shared, pattern, backend):
    q, k, v, key_mask, q_offset, sel, flags = _inputs(case, shared, PATTERNS[pattern])
    kwargs = dict(key_mask=key_mask, q_offset=q_offset, backend=backend)
    out, lse = block_sparse_attention(q, k, v, sel, **kwargs)
    ref, ref_lse = block_sparse_attention(q, k, v, sel.without_dense_heads(), **kwargs)
    assert out.shape == ref.shape and out.dtype == ref.dtype and lse.dtype == torch.float32
    assert rel_rms(out, ref) < 1e-5
    dense_q = _query_heads(flags, q.shape[1])
    assert torch.equal(torch.isnan(lse), dense_q.view(1, -1, 1).expand_as(lse)), "lse is NaN exactly on dense heads"
    assert torch.equal(lse[:, ~dense_q], ref_lse[:, ~dense_q])
    # Padding queries that see no key are 0 on the dense heads too.
    assert torch.equal(out[torch.isinf(ref_lse)], ref[torch.isinf(ref_lse)])


def test_dense_heads_on_the_triton_kernel():
    pytest.importorskip("triton")
    case = CASES[3]
    for shared in (False, True):
        q, k, v, key_mask, q_offset, sel, flags = _inputs(case, shared, PATTERNS["alternate"], seed=2)
        out, lse = block_sparse_attention(q, k, v, sel, key_mask=key_mask, q_offset=q_offset, backend="triton")
        ref, ref_lse = block_sparse_attention_naive(q, k, v, sel, key_mask=key_mask, q_offset=q_offset)
        assert rel_rms(out, ref) < 1e-5
        dense_q = _query_heads(flags, q.shape[1])
        assert bool(torch.isnan(lse[:, dense_q]).all())
        torch.testing.assert_close(lse[:, ~dense_q], ref_lse[:, ~dense_q], atol=1e-5, rtol=1e-5)


def test_bf16():
    q, k, v, key_mask, q_offset, sel, flags = _inputs(CASES[2], True, PATTERNS["first"])
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out, _ = block_sparse_attention(q, k, v, sel)
    ref, _ = block_sparse_attention_naive(q, k, v, sel)
    assert out.dtype == torch.bfloat16 and rel_rms(out, ref) < 1e-2


def test_the_flag_is_ignored_with_a_position_policy_without_causality_and_on_naive():
    q, k, v, key_mask, q_offset, sel, flags = _inputs(CASES[0], True, PATTERNS["first"])
    plan = Reposition(Original(), Rope(1.0 / (10000.0 ** (torch.arange(0, D, 2) / D)), 4096), 16)
    for kwargs in (dict(reposition=plan), dict(causal=False), dict(backend="naive")):
        out, lse = block_sparse_attention(q, k, v, sel, **kwargs)
        ref, ref_lse = block_sparse_attention(q, k, v, sel.without_dense_heads(), **kwargs)
        assert not bool(torch.isnan(lse).any())
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(lse, ref_lse)


def test_sparse_heads_really_stay_sparse():
    # Guard: the flag on one head does not turn the others dense.
    q, k, v, key_mask, q_offset, sel, flags = _inputs(CASES[0], False, PATTERNS["first"])
    every = Selection.from_mask(torch.ones_like(sel.to_mask(7)), 16, 16, dense_heads=torch.ones_like(flags))
    out, _ = block_sparse_attention(q, k, v, sel)
    dense, _ = block_sparse_attention(q, k, v, every)
    assert rel_rms(out[:, 1:], dense[:, 1:]) > 0.1 and rel_rms(out[:, :1], dense[:, :1]) < 1e-5


def test_dense_heads_validation():
    sel = Selection.from_mask(torch.ones(1, 2, 1, 1, dtype=torch.bool), 16, 16)
    for bad in (torch.ones(3, dtype=torch.bool), torch.ones(2), torch.ones(1, 2, dtype=torch.bool), (True,),
                (1, 0), "tf"):
        with pytest.raises(ValueError, match=r"dense_heads must be H=2 bools"):
            Selection(sel.indices, sel.counts, 16, 16, bad)  # type: ignore[arg-type]
    for flags in ([True, False], (True, False), torch.tensor([True, False])):  # stored host-side, as a tuple
        flagged = Selection(sel.indices, sel.counts, 16, 16, flags)  # type: ignore[arg-type]
        assert flagged.dense_heads == (True, False) and not flagged.all_dense
    assert flagged.without_dense_heads().dense_heads is None and sel.without_dense_heads() is sel
    assert Selection(sel.indices, sel.counts, 16, 16, (True, True)).all_dense and not sel.all_dense


def test_all_dense_heads_skip_the_backend(monkeypatch):
    import longattn.ops.block_sparse as dispatch

    q, k, v, key_mask, q_offset, sel, flags = _inputs(CASES[4], True, PATTERNS["all"])

    def no_backend(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"backend {name!r} ran although every head is dense")
        return refuse

    monkeypatch.setattr(dispatch, "backend_function", no_backend)
    out, lse = block_sparse_attention(q, k, v, sel, key_mask=key_mask)
    ref, _ = block_sparse_attention_naive(q, k, v, sel, key_mask=key_mask)
    assert rel_rms(out, ref) < 1e-5 and bool(torch.isnan(lse).all())


def test_a_bad_sparse_head_is_still_caught_beside_dense_ones():
    # The dispatcher skips the Selection's value check for dense heads; the backend still checks the others.
    q, k, v, key_mask, q_offset, sel, flags = _inputs(CASES[0], False, PATTERNS["first"])
    indices = sel.indices.clone()
    indices[0, 1, 0, 0] = 10_000
    bad = Selection(indices, sel.counts, sel.query_block_size, sel.kv_block_size, sel.dense_heads)
    with pytest.raises(ValueError, match="selection indices must lie in"):
        block_sparse_attention(q, k, v, bad)
    with pytest.raises(ValueError, match=r"selection \[B, H\]"):
        block_sparse_attention(q[:, :3], k[:, :1], v[:, :1], sel)
