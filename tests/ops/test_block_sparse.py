"""The block-sparse operator against dense SDPA and a masked dense reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.core.selection import Selection, causal_pairs
from longattn.ops import block_sparse_attention, block_sparse_attention_cpu, block_sparse_attention_reference, merge_attention, resolve_backend, triton_available

OPS = {"reference": block_sparse_attention_reference, "cpu": block_sparse_attention_cpu}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-12))


def make_qkv(b, hq, hkv, tq, tk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    return q, k, v


def full_selection(b, h, tq, tk, qbs, bs, random_order_seed=None):
    nqb, nkb = -(-tq // qbs), -(-tk // bs)
    return Selection.from_mask(torch.ones(b, h, nqb, nkb, dtype=torch.bool), qbs, bs)


def masked_dense(q, k, v, selection, key_mask=None):
    """Reference of the reference: dense SDPA with the token mask a Selection implies (small shapes only)."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    bs, qbs = selection.kv_block_size, selection.q_block_size
    nkb = -(-tk // bs)
    blocks = selection.to_mask(nkb)  # [B, H, Qblk, Nblk]
    blocks = blocks.repeat_interleave(hq // blocks.shape[1], dim=1)
    tokens = blocks.repeat_interleave(qbs, dim=2)[:, :, :tq].repeat_interleave(bs, dim=3)[..., :tk]
    qpos = (tk - tq + torch.arange(tq)).view(-1, 1)
    allowed = tokens & (torch.arange(tk).view(1, -1) <= qpos)
    if key_mask is not None:
        allowed = allowed & key_mask.view(b, 1, 1, tk)
    kr = k.float().repeat_interleave(hq // hkv, dim=1)
    vr = v.float().repeat_interleave(hq // hkv, dim=1)
    scores = (q.float() @ kr.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.where(allowed, torch.exp(scores - lse.unsqueeze(-1).clamp(min=-1e30)), torch.zeros_like(scores))
    out = p @ vr
    return out, lse


SHAPES = [  # (B, Hq, Hkv, Tq, Tk, D, bs, qbs)
    (1, 4, 4, 64, 64, 16, 16, 16),
    (2, 8, 2, 100, 100, 32, 16, 32),
    (1, 9, 3, 257, 257, 64, 64, 64),
    (2, 6, 2, 70, 333, 16, 32, 16),  # chunked prefill: queries are the last 70 of 333 keys
    (1, 8, 2, 1, 1000, 64, 64, 1),  # decode
]


@pytest.mark.parametrize("backend", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape", SHAPES, ids=[f"B{s[0]}-H{s[1]}-HKV{s[2]}-Tq{s[3]}-T{s[4]}-D{s[5]}-bs{s[6]}-qbs{s[7]}" for s in SHAPES]
)
def test_all_blocks_equal_causal_sdpa(shape, dtype, backend):
    b, hq, hkv, tq, tk, d, bs, qbs = shape
    q, k, v = make_qkv(b, hq, hkv, tq, tk, d, dtype)
    out, lse = OPS[backend](q, k, v, full_selection(b, hq, tq, tk, qbs, bs))
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
    backend=st.sampled_from(sorted(OPS)),
    padded=st.booleans(),
)
def test_random_selection_matches_masked_dense(b, hkv, group, tk, q_frac, bs, qbs, share, density, seed, backend, padded):
    hq = hkv * group
    tq = max(1, round(tk * q_frac))
    q, k, v = make_qkv(b, hq, hkv, tq, tk, 8, seed=seed)
    h = hkv if share else hq
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, -(-tq // qbs), -(-tk // bs), generator=g) < density
    sel = Selection.from_mask(mask, qbs, bs)
    key_mask = (torch.rand(b, tk, generator=g) < 0.8) if padded else None
    out, lse = OPS[backend](q, k, v, sel, key_mask=key_mask)
    ref, ref_lse = masked_dense(q, k, v, sel, key_mask)
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


@pytest.mark.parametrize("backend", sorted(OPS))
def test_key_mask_equals_sdpa_with_padding(backend):
    q, k, v = make_qkv(2, 4, 2, 80, 80, 16, seed=5)
    key_mask = torch.ones(2, 80, dtype=torch.bool)
    key_mask[1, :23] = False  # left padding
    out, _ = OPS[backend](q, k, v, full_selection(2, 4, 80, 80, 16, 16), key_mask=key_mask)
    allowed = (torch.arange(80).view(1, -1) <= torch.arange(80).view(-1, 1)) & key_mask.view(2, 1, 1, 80)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    # Rows of padding queries see no key: defined as zero output, compared only where a key exists.
    assert torch.all(out[1, :, :23] == 0)
    torch.testing.assert_close(out[:, :, 23:], ref[:, :, 23:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", sorted(OPS))
def test_empty_rows_give_zero_and_minus_inf(backend):
    q, k, v = make_qkv(1, 2, 1, 32, 32, 8)
    empty = Selection.from_mask(torch.zeros(1, 2, 2, 2, dtype=torch.bool), 16, 16)
    out, lse = OPS[backend](q, k, v, empty)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    # A selected block entirely in a row's future leaves that row empty too (block 1 for rows 0..15).
    future = Selection.from_mask(torch.tensor([[[[False, True], [False, True]]]]).expand(1, 2, 2, 2).contiguous(), 16, 16)
    out, lse = OPS[backend](q, k, v, future)
    assert torch.all(lse[:, :, :16] == float("-inf")) and torch.all(out[:, :, :16] == 0)
    assert torch.all(torch.isfinite(lse[:, :, 16:]))


def test_backends_agree_on_a_long_sparse_case():
    q, k, v = make_qkv(1, 8, 2, 1000, 1000, 64, seed=11)
    g = torch.Generator().manual_seed(2)
    sel = Selection.from_mask(torch.rand(1, 8, 16, 16, generator=g) < 0.3, 64, 64)
    a, la = block_sparse_attention_reference(q, k, v, sel)
    b, lb = block_sparse_attention_cpu(q, k, v, sel)
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
    assert resolve_backend("auto", "cuda") == ("triton" if triton_available() else "reference")
    assert resolve_backend("auto", "cpu") == "reference" and resolve_backend("auto", "cuda", positions=True) == "reference"
    with pytest.raises(ValueError, match="key_mask"):
        block_sparse_attention(q, k, v, full_selection(1, 2, 16, 16, 16, 16), key_mask=torch.ones(1, 15, dtype=torch.bool))


@pytest.mark.parametrize("backend", sorted(OPS))
def test_strided_cache_takes_the_token_gather_and_agrees(backend):
    q, k, v = make_qkv(1, 4, 2, 90, 90, 16, seed=9)
    k_strided = torch.cat([k, k], dim=-1)[..., :16]  # same values, not contiguous
    v_strided = torch.cat([v, v], dim=-1)[..., :16]
    assert not k_strided.is_contiguous()
    g = torch.Generator().manual_seed(3)
    sel = Selection.from_mask(torch.rand(1, 4, 6, 6, generator=g) < 0.5, 16, 16)
    a, la = OPS[backend](q, k, v, sel)
    b, lb = OPS[backend](q, k_strided, v_strided, sel)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(la, lb)
