"""The Triton block-sparse kernel against naive (CPU interpreter in CI, CUDA at full size)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.core.positions import LongHeadsLayout
from longattn.core.reposition import Reposition
from longattn.core.rope import Rope
from longattn.core.selection import Selection
from longattn.ops import backend_function, block_sparse_attention, block_sparse_attention_naive
from tests.ops.common import assert_matches_naive, full_selection, make_qkv, masked_dense, rel_rms
from tests.ops.gpu_helpers import DEVICE, TRITON_MISSING, requires_cuda, shape_id

pytest.importorskip("triton", reason=TRITON_MISSING)
from longattn.ops.block_sparse.triton_kernel import (  # noqa: E402
    block_sparse_attention_triton,
    sparse_attention_launch,
)

# (B, Hq, Hkv, Tq, Tk, D, bs, qbs): lengths not divisible by the block sizes, GQA, chunked prefill, decode.
SMALL = [
    (1, 4, 2, 64, 64, 16, 16, 16),
    (2, 8, 2, 100, 100, 32, 16, 32),
    (1, 4, 1, 200, 200, 64, 128, 64),  # a block wider than a key tile
    (1, 4, 2, 70, 333, 64, 32, 16),  # chunked prefill: the last 70 of 333 keys
    (1, 2, 1, 130, 130, 128, 64, 64),
    (1, 8, 2, 1, 1000, 64, 64, 1),  # decode: split-K
    (2, 4, 2, 1, 517, 64, 16, 1),
]
FULL = [  # CUDA only
    (1, 32, 8, 4096, 4096, 128, 64, 64),
    (1, 32, 8, 2000, 8000, 128, 16, 64),
    (1, 8, 2, 1000, 1000, 64, 64, 64),
    (2, 32, 8, 1, 32768, 128, 16, 1),
    (1, 32, 8, 1, 100_000, 128, 128, 1),
]
DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}


def _run(shape, dtype, pattern: str, shared: bool, seed: int = 0, key_mask: bool = False, q_offset=None):
    b, hq, hkv, tq, tk, d, bs, qbs = shape
    q, k, v = (t.to(DEVICE) for t in make_qkv(b, hq, hkv, tq, tk, d, dtype, seed=seed))
    h = hkv if shared else hq
    nqb, nkb = -(-tq // qbs), -(-tk // bs)
    g = torch.Generator().manual_seed(seed + 1)
    if pattern == "random":
        mask = torch.rand(b, h, nqb, nkb, generator=g) < 0.4
    elif pattern == "one":
        mask = torch.zeros(b, h, nqb, nkb, dtype=torch.bool)
        mask[..., torch.randint(0, nkb, (1,), generator=g)] = True
    elif pattern == "empty":
        mask = torch.rand(b, h, nqb, nkb, generator=g) < 0.4
        mask[:, :, ::2] = False  # every other query block selects nothing
    else:
        mask = torch.ones(b, h, nqb, nkb, dtype=torch.bool)
    sel = Selection.from_mask(mask.to(DEVICE), qbs, bs)
    km = (torch.rand(b, tk, generator=g) < 0.8).to(DEVICE) if key_mask else None
    out, lse = block_sparse_attention_triton(q, k, v, sel, key_mask=km, q_offset=q_offset)
    ref, ref_lse = block_sparse_attention_naive(q, k, v, sel, key_mask=km, q_offset=q_offset)
    assert out.dtype == dtype and out.shape == q.shape
    assert_matches_naive(out, lse, ref, ref_lse, TOL[dtype])
    return out, ref


@pytest.mark.parametrize("shared", [False, True], ids=["per-q-head", "per-kv-head"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SMALL, ids=[shape_id(*s[:7]) for s in SMALL])
def test_random_selection_matches_naive(shape, dtype, shared):
    _run(shape, dtype, "random", shared)


@pytest.mark.parametrize("pattern", ["empty", "one", "all"])
@pytest.mark.parametrize("shape", [SMALL[1], SMALL[3], SMALL[5]], ids=[shape_id(*SMALL[i][:7]) for i in (1, 3, 5)])
def test_edge_selections_match_naive(shape, pattern):
    _run(shape, torch.float16, pattern, shared=False)


def test_padding_key_mask_and_fp32():
    _run(SMALL[1], torch.float32, "random", shared=True, key_mask=True)
    _run(SMALL[5], torch.float32, "random", shared=False, key_mask=True)


def test_queries_in_the_middle_of_the_keys():
    _run((1, 4, 2, 40, 200, 32, 16, 16), torch.float32, "random", shared=True, q_offset=75)


def test_all_blocks_equal_causal_sdpa():
    b, hq, hkv, tq, tk, d, bs, qbs = 1, 4, 2, 70, 150, 32, 16, 16
    q, k, v = (t.to(DEVICE) for t in make_qkv(b, hq, hkv, tq, tk, d, torch.float16, seed=4))
    every = torch.ones(b, hq, -(-tq // qbs), -(-tk // bs), dtype=torch.bool, device=DEVICE)
    out, _ = block_sparse_attention(q, k, v, Selection.from_mask(every, qbs, bs), backend="triton")
    allowed = torch.arange(tk, device=DEVICE).view(1, -1) <= (tk - tq + torch.arange(tq, device=DEVICE)).view(-1, 1)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed, enable_gqa=True)
    assert rel_rms(out, ref) < 5e-3


def test_sparse_differs_from_dense():
    # Guard: a small selection really drops keys (the kernel does not silently attend everything).
    sparse, _ = _run(SMALL[1], torch.float16, "one", shared=False)
    dense, _ = _run(SMALL[1], torch.float16, "all", shared=False)
    assert rel_rms(sparse, dense) > 0.1


def test_dispatch_runs_the_kernel():
    assert backend_function("triton") is block_sparse_attention_triton
    # Decode picks split-K by itself (more than one program per row here).
    from longattn.ops.block_sparse.triton_kernel import default_num_splits

    assert default_num_splits(1, 2, 16, DEVICE) > 1 and default_num_splits(4096, 2048, 16, DEVICE) == 1


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_split_k_equals_one_program(splits):
    b, hq, hkv, tq, tk, d, bs, qbs = SMALL[5]
    q, k, v = (t.to(DEVICE) for t in make_qkv(b, hq, hkv, tq, tk, d, torch.float32, seed=5))
    sel = Selection.from_mask(torch.rand(b, hkv, 1, -(-tk // bs), generator=torch.Generator().manual_seed(2)).lt(0.6)
                              .to(DEVICE), qbs, bs)
    one, lse1 = sparse_attention_launch(q, k, v, sel, num_splits=1)
    many, lse_many = sparse_attention_launch(q, k, v, sel, num_splits=splits)
    torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_many, lse1, atol=1e-5, rtol=1e-5)


def test_reads_a_strided_cache_in_place():
    # K/V as views of a larger preallocated cache ([B, Hkv, capacity, D], only the first Tk filled).
    b, hq, hkv, tq, tk, d, bs, qbs = SMALL[3]
    q, k, v = (t.to(DEVICE) for t in make_qkv(b, hq, hkv, tq, tk, d, torch.float16, seed=6))
    big_k = torch.zeros(b, hkv, tk + 50, d, dtype=k.dtype, device=DEVICE)
    big_v = torch.zeros_like(big_k)
    big_k[:, :, :tk], big_v[:, :, :tk] = k, v
    sel = Selection.from_mask((torch.rand(b, hq, -(-tq // qbs), -(-tk // bs)) < 0.5).to(DEVICE), qbs, bs)
    out, _ = block_sparse_attention(q, big_k[:, :, :tk], big_v[:, :, :tk], sel, backend="triton")
    ref, _ = block_sparse_attention_naive(q, k, v, sel)
    assert rel_rms(out, ref) < TOL[torch.float16]


def test_bad_launch_geometry_raises():
    b, hq, hkv, tq, tk, d, bs, qbs = SMALL[0]
    q, k, v = (t.to(DEVICE) for t in make_qkv(b, hq, hkv, tq, tk, d, torch.float16))
    sel = full_selection(b, hq, tq, tk, qbs, bs)
    sel = Selection(sel.indices.to(DEVICE), sel.counts.to(DEVICE), qbs, bs)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        sparse_attention_launch(q, k, v, sel, block_n=24)
    with pytest.raises(ValueError, match="num_splits"):
        sparse_attention_launch(q, k, v, sel, num_splits=0)
    with pytest.raises(ValueError, match="reposition= .* runs on backend 'auto', 'gather' or 'naive'"):
        block_sparse_attention(q, k, v, sel, backend="triton", reposition=Reposition(  # moves single blocks
            LongHeadsLayout(), Rope(torch.ones(d // 2), 1 << 20), 0))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", FULL, ids=[shape_id(*s[:7]) for s in FULL])
def test_full_size_on_gpu(shape, dtype):
    _run(shape, dtype, "random", shared=True)
    _run(shape, dtype, "random", shared=False, key_mask=True)


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3), tk=st.integers(1, 150),
    q_frac=st.floats(0.0, 1.0), bs=st.sampled_from([8, 16, 32, 128]), qbs=st.sampled_from([1, 16, 32]),
    share=st.booleans(), density=st.floats(0.0, 1.0), padded=st.booleans(), seed=st.integers(0, 10_000),
)
def test_random_geometry_matches_masked_dense(b, hkv, group, tk, q_frac, bs, qbs, share, density, padded, seed):
    hq = hkv * group
    tq = max(1, round(tk * q_frac))
    q, k, v = make_qkv(b, hq, hkv, tq, tk, 16, seed=seed)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, hkv if share else hq, -(-tq // qbs), -(-tk // bs), generator=g) < density
    sel = Selection.from_mask(mask, qbs, bs)
    key_mask = (torch.rand(b, tk, generator=g) < 0.8) if padded else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out, lse = block_sparse_attention_triton(to(q), to(k), to(v), Selection(to(sel.indices), to(sel.counts), qbs, bs),
                                             key_mask=to(key_mask))
    ref, ref_lse = masked_dense(q, k, v, sel, key_mask)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-4)
