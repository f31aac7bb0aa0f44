"""The block-sparse operator: every CPU backend against naive, naive against dense SDPA, and the dispatcher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.core.selection import Selection, causal_pairs
from longattn.ops import (
    block_sparse_attention,
    block_sparse_attention_cpu,
    block_sparse_attention_gather,
    block_sparse_attention_naive,
    block_sparse_attention_native,
    merge_attention,
    native_available,
    resolve_backend,
    triton_available,
)
from tests.ops.common import (
    assert_matches_naive,
    case_id,
    full_selection,
    make_qkv,
    masked_dense,
    random_selection,
    rel_rms,
)

OPS = {"gather": block_sparse_attention_gather, "cpu": block_sparse_attention_cpu}
if native_available():  # the C kernel builds here (x86-64 with AVX-512 and a C compiler)
    OPS["native"] = block_sparse_attention_native
ALL_OPS = OPS | {"naive": block_sparse_attention_naive}

SHAPES = [  # (B, Hq, Hkv, Tq, Tk, D, bs, qbs)
    (1, 4, 4, 64, 64, 16, 16, 16),
    (2, 8, 2, 100, 100, 32, 16, 32),
    (1, 9, 3, 257, 257, 64, 64, 64),
    (2, 6, 2, 70, 333, 16, 32, 16),  # chunked prefill: queries are the last 70 of 333 keys
    (1, 8, 2, 1, 1000, 64, 64, 1),  # decode
]
SHAPE_IDS = [case_id(*s) for s in SHAPES]

# (B, Hq, Hkv, Tq, Tk, D, bs, qbs, q_offset, padded): GQA, padding, explicit q_offset, decode, odd lengths.
NAIVE_CASES = [
    (1, 4, 4, 64, 64, 16, 16, 16, None, False),
    (2, 8, 2, 100, 100, 32, 16, 32, None, True),
    (1, 6, 2, 130, 130, 64, 64, 16, None, False),  # a key block spanning several query blocks
    (2, 6, 2, 70, 333, 16, 32, 16, None, True),  # chunked prefill: the last 70 of 333 keys
    (1, 4, 2, 40, 200, 16, 16, 16, 75, False),  # queries in the middle of the keys (q_offset)
    (1, 8, 2, 1, 1000, 64, 64, 1, None, False),  # decode
    (2, 4, 1, 1, 517, 32, 16, 1, None, True),  # padded decode
]


@pytest.mark.parametrize("shared", [False, True], ids=["per-q-head", "per-kv-head"])
@pytest.mark.parametrize("backend", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", NAIVE_CASES, ids=[case_id(*c[:8], q_offset=c[8]) + ("-pad" if c[9] else "")
                                                   for c in NAIVE_CASES])
def test_backend_matches_naive(case, dtype, backend, shared):
    b, hq, hkv, tq, tk, d, bs, qbs, q_offset, padded = case
    q, k, v = make_qkv(b, hq, hkv, tq, tk, d, dtype, seed=tk)
    sel = random_selection(b, hkv if shared else hq, tq, tk, qbs, bs, 0.4, seed=tq)
    g = torch.Generator().manual_seed(1)
    key_mask = (torch.rand(b, tk, generator=g) < 0.8) if padded else None
    out, lse = OPS[backend](q, k, v, sel, key_mask=key_mask, q_offset=q_offset)
    ref, ref_lse = block_sparse_attention_naive(q, k, v, sel, key_mask=key_mask, q_offset=q_offset)
    assert_matches_naive(out, lse, ref, ref_lse, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("backend", sorted(ALL_OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_all_blocks_equal_causal_sdpa(shape, dtype, backend):
    b, hq, hkv, tq, tk, d, bs, qbs = shape
    q, k, v = make_qkv(b, hq, hkv, tq, tk, d, dtype)
    out, lse = ALL_OPS[backend](q, k, v, full_selection(b, hq, tq, tk, qbs, bs))
    # SDPA's is_causal aligns the mask top-left; queries are the newest keys, so build the mask explicitly.
    allowed = torch.arange(tk).view(1, -1) <= (tk - tq + torch.arange(tq)).view(-1, 1)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed, enable_gqa=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (b, hq, tq, d) and lse.shape == (b, hq, tq)
    assert rel_rms(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_shared_kv_head_selection_equals_per_query_head():
    q, k, v = make_qkv(2, 8, 2, 96, 96, 16, seed=3)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 2, 6, 6, generator=g) < 0.5
    shared = Selection.from_mask(mask, 16, 16)
    per_head = Selection.from_mask(mask.repeat_interleave(4, dim=1), 16, 16)
    a, la = block_sparse_attention(q, k, v, shared)
    b, lb = block_sparse_attention(q, k, v, per_head)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(la, lb)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    tk=st.integers(1, 150),
    q_frac=st.floats(0.0, 1.0),
    bs=st.sampled_from([8, 16, 32]),
    qbs=st.sampled_from([1, 8, 16]),
    share=st.booleans(),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    backend=st.sampled_from(sorted(ALL_OPS)),
    padded=st.booleans(),
    shift=st.integers(0, 30),
)
def test_random_selection_matches_masked_dense(b, hkv, group, tk, q_frac, bs, qbs, share, density, seed, backend, padded,
                                               shift):
    hq = hkv * group
    tq = max(1, round(tk * q_frac))
    q_offset = max(0, tk - tq - shift)  # queries ending `shift` keys before the last one (chunked prefill)
    q, k, v = make_qkv(b, hq, hkv, tq, tk, 8, seed=seed)
    h = hkv if share else hq
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, -(-tq // qbs), -(-tk // bs), generator=g) < density
    sel = Selection.from_mask(mask, qbs, bs)
    key_mask = (torch.rand(b, tk, generator=g) < 0.8) if padded else None
    out, lse = ALL_OPS[backend](q, k, v, sel, key_mask=key_mask, q_offset=q_offset)
    ref, ref_lse = masked_dense(q, k, v, sel, key_mask, q_offset)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(tk=st.integers(1, 120), q_frac=st.floats(0.0, 1.0), bs=st.sampled_from([4, 16]), qbs=st.sampled_from([1, 4, 32]),
       seed=st.integers(0, 1000))
def test_pairs_match_token_mask(tk, q_frac, bs, qbs, seed):
    tq = max(1, round(tk * q_frac))
    g = torch.Generator().manual_seed(seed)
    sel = Selection.from_mask(torch.rand(1, 2, -(-tq // qbs), -(-tk // bs), generator=g) < 0.6, qbs, bs)
    blocks = sel.to_mask(-(-tk // bs))
    tokens = blocks.repeat_interleave(qbs, dim=2)[:, :, :tq].repeat_interleave(bs, dim=3)[..., :tk]
    causal = torch.arange(tk).view(1, -1) <= (tk - tq + torch.arange(tq)).view(-1, 1)
    assert torch.equal(sel.pairs(tq, tk), (tokens & causal).sum(dim=(-1, -2)))
    assert causal_pairs(tq, tk) == int(causal.sum())


@pytest.mark.parametrize("backend", sorted(ALL_OPS))
def test_key_mask_equals_sdpa_with_padding(backend):
    q, k, v = make_qkv(2, 4, 2, 80, 80, 16, seed=5)
    key_mask = torch.ones(2, 80, dtype=torch.bool)
    key_mask[1, :23] = False  # left padding
    out, _ = ALL_OPS[backend](q, k, v, full_selection(2, 4, 80, 80, 16, 16), key_mask=key_mask)
    allowed = (torch.arange(80).view(1, -1) <= torch.arange(80).view(-1, 1)) & key_mask.view(2, 1, 1, 80)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    # Rows of padding queries see no key: defined as zero output, compared only where a key exists.
    assert torch.all(out[1, :, :23] == 0)
    torch.testing.assert_close(out[:, :, 23:], ref[:, :, 23:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", sorted(ALL_OPS))
def test_empty_rows_give_zero_and_minus_inf(backend):
    q, k, v = make_qkv(1, 2, 1, 32, 32, 8)
    empty = Selection.from_mask(torch.zeros(1, 2, 2, 2, dtype=torch.bool), 16, 16)
    out, lse = ALL_OPS[backend](q, k, v, empty)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    # A selected block entirely in a row's future leaves that row empty too (block 1 for rows 0..15).
    future = Selection.from_mask(torch.tensor([[[[False, True], [False, True]]]]).expand(1, 2, 2, 2).contiguous(), 16, 16)
    out, lse = ALL_OPS[backend](q, k, v, future)
    assert torch.all(lse[:, :, :16] == float("-inf")) and torch.all(out[:, :, :16] == 0)
    assert torch.all(torch.isfinite(lse[:, :, 16:]))


@pytest.mark.parametrize("backend", sorted(OPS))
def test_backends_agree_with_naive_on_a_long_sparse_case(backend):
    q, k, v = make_qkv(1, 8, 2, 1000, 1000, 64, seed=11)
    g = torch.Generator().manual_seed(2)
    sel = Selection.from_mask(torch.rand(1, 8, 16, 16, generator=g) < 0.3, 64, 64)
    a, la = block_sparse_attention_naive(q, k, v, sel)
    b, lb = OPS[backend](q, k, v, sel)
    assert rel_rms(b, a) < 1e-5
    finite = torch.isfinite(la)
    assert torch.equal(finite, torch.isfinite(lb)) and rel_rms(lb[finite], la[finite]) < 1e-5


def test_merge_of_disjoint_halves_equals_whole():
    q, k, v = make_qkv(2, 6, 3, 50, 200, 16, seed=7)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 6, 4, 13, generator=g) < 0.7
    split = torch.rand(2, 6, 4, 13, generator=g) < 0.5
    whole = block_sparse_attention(q, k, v, Selection.from_mask(mask, 16, 16))
    part_a = block_sparse_attention(q, k, v, Selection.from_mask(mask & split, 16, 16))
    part_b = block_sparse_attention(q, k, v, Selection.from_mask(mask & ~split, 16, 16))
    out, lse = merge_attention(*part_a, *part_b)
    torch.testing.assert_close(out, whole[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, whole[1], atol=1e-5, rtol=1e-4)


def test_sparse_selection_differs_from_dense():
    q, k, v = make_qkv(1, 4, 2, 256, 256, 16)
    dense = block_sparse_attention(q, k, v, full_selection(1, 4, 256, 256, 16, 16))[0]
    diag = Selection.from_mask(torch.eye(16, dtype=torch.bool).expand(1, 4, 16, 16).contiguous(), 16, 16)
    sparse = block_sparse_attention(q, k, v, diag)[0]
    assert rel_rms(sparse, dense) > 0.1


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v, s: (q[0], k, v, s), "q must be a 4-D"),
        (lambda q, k, v, s: (q.long(), k, v, s), "q must be float32"),
        (lambda q, k, v, s: (q, k.half(), v, s), "share a dtype"),
        (lambda q, k, v, s: (q, k, v[:, :, :-1], s), "same shape"),
        (lambda q, k, v, s: (q[:, :3], k, v, s), "multiple of KV heads"),
        (lambda q, k, v, s: (q, k[..., :4], v[..., :4], s), "k must be"),
        (lambda q, k, v, s: (q, k, v, Selection(s.indices, s.counts, 8, 16)), "query blocks"),
        (lambda q, k, v, s: (q, k, v, Selection(s.indices.clone().fill_(0), s.counts, 16, 16)), "must not repeat"),
        (lambda q, k, v, s: (q, k, v, Selection(s.indices + 5, s.counts, 16, 16)), "must lie in"),
        (lambda q, k, v, s: (q, k, v, Selection(s.indices[:, :3], s.counts[:, :3], 16, 16)), "selection heads"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(mutate, match):
    q, k, v = make_qkv(1, 4, 2, 64, 64, 8)
    sel = full_selection(1, 4, 64, 64, 16, 16)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(*mutate(q, k, v, sel))


def test_bad_selection_dtype_and_backend():
    q, k, v = make_qkv(1, 2, 1, 16, 16, 8)
    with pytest.raises(ValueError, match="int32"):
        Selection(torch.zeros(1, 2, 1, 1, dtype=torch.int64), torch.ones(1, 2, 1, dtype=torch.int32), 16, 16)
    with pytest.raises(ValueError, match="kv_block_size"):
        Selection(torch.zeros(1, 2, 1, 1, dtype=torch.int32), torch.ones(1, 2, 1, dtype=torch.int32), 16, 0)
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, k, v, full_selection(1, 2, 16, 16, 16, 16), backend="cuda-magic")
    with pytest.raises(ValueError, match="CPU tensors only"):
        resolve_backend("cpu", "cuda")
    assert resolve_backend("auto", "cuda") == ("triton" if triton_available() else "gather")
    assert resolve_backend("auto", "cpu") == ("native" if native_available() else "gather")
    assert resolve_backend("auto", "cpu", reposition=True) == "gather"
    assert resolve_backend("auto", "cuda", reposition=True) == "gather"
    assert resolve_backend("naive", "cpu", reposition=True) == "naive" and resolve_backend("naive", "cuda") == "naive"
    with pytest.raises(ValueError, match="key_mask"):
        block_sparse_attention(q, k, v, full_selection(1, 2, 16, 16, 16, 16), key_mask=torch.ones(1, 15, dtype=torch.bool))


@pytest.mark.parametrize("backend", sorted(ALL_OPS))
def test_strided_cache_takes_the_token_gather_and_agrees(backend):
    q, k, v = make_qkv(1, 4, 2, 90, 90, 16, seed=9)
    k_strided = torch.cat([k, k], dim=-1)[..., :16]  # same values, not contiguous
    v_strided = torch.cat([v, v], dim=-1)[..., :16]
    assert not k_strided.is_contiguous()
    g = torch.Generator().manual_seed(3)
    sel = Selection.from_mask(torch.rand(1, 4, 6, 6, generator=g) < 0.5, 16, 16)
    a, la = ALL_OPS[backend](q, k, v, sel)
    b, lb = ALL_OPS[backend](q, k_strided, v_strided, sel)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(la, lb)


def test_the_old_backend_name_says_it_was_renamed():
    q, k, v = make_qkv(1, 2, 1, 16, 16, 8)
    sel = full_selection(1, 2, 16, 16, 16, 16)
    for call in (lambda: block_sparse_attention(q, k, v, sel, backend="reference"),
                 lambda: resolve_backend("reference", "cpu")):
        with pytest.raises(ValueError, match=r"'reference' was renamed to 'gather'.*'auto', 'gather', 'cpu'"):
            call()


@pytest.mark.parametrize("backend", sorted(ALL_OPS))
def test_forced_backends_run_through_the_dispatcher(backend):
    q, k, v = make_qkv(1, 4, 2, 50, 90, 16, seed=4)
    sel = random_selection(1, 2, 50, 90, 16, 16, 0.5, seed=5)
    ref, ref_lse = block_sparse_attention_naive(q, k, v, sel)
    out, lse = block_sparse_attention(q, k, v, sel, backend=backend)
    assert_matches_naive(out, lse, ref, ref_lse, 1e-5)
