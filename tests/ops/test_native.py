"""The native C kernel against naive (shapes, dtypes, GQA sharing, padding, decode, odd head sizes), its clean
fallback where it cannot be built, and the partial-last-block NaN leak on every CPU backend."""

from __future__ import annotations

import pytest
import torch

from longattn.core.selection import Selection
from longattn.ops import (
    block_sparse_attention_cpu,
    block_sparse_attention_gather,
    block_sparse_attention_naive,
    block_sparse_attention_native,
    native_available,
    resolve_backend,
)
from longattn.ops.block_sparse import native
from tests.ops.common import assert_matches_naive, case_id, make_qkv, random_selection

needs_native = pytest.mark.skipif(not native_available(), reason=native.native_unavailable_reason())

# (B, Hq, Hkv, Tq, Tk, D, bs, qbs, q_offset, padded): rows-in-lanes tiles (> 4 rows), the keys-in-lanes row path
# (decode, <= 4 rows), ragged blocks (bs 8, 24), odd head sizes (24, 80: the generic-D paths), chunked prefill.
CASES = [
    (1, 4, 4, 64, 64, 64, 16, 16, None, False),
    (2, 8, 2, 100, 100, 32, 16, 32, None, True),
    (1, 9, 3, 257, 257, 64, 8, 64, None, False),
    (2, 6, 2, 70, 333, 16, 24, 16, None, True),  # chunked prefill, blocks not a multiple of 16
    (1, 4, 2, 40, 200, 80, 16, 16, 75, False),  # queries in the middle; D = 80
    (1, 6, 3, 50, 90, 24, 16, 4, None, False),  # D = 24; 4-row query blocks: the row path
    (1, 8, 2, 1, 1000, 64, 64, 1, None, False),  # decode
    (2, 4, 1, 1, 517, 128, 16, 1, None, True),  # padded decode, D = 128
]


@needs_native
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "free"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-q-head", "per-kv-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(*c[:8], q_offset=c[8]) + ("-pad" if c[9] else "") for c in CASES])
def test_native_matches_naive(case, dtype, shared, causal):
    b, hq, hkv, tq, tk, d, bs, qbs, q_offset, padded = case
    q, k, v = make_qkv(b, hq, hkv, tq, tk, d, dtype, seed=tk + d)
    sel = random_selection(b, hkv if shared else hq, tq, tk, qbs, bs, 0.4, seed=tq)
    g = torch.Generator().manual_seed(1)
    key_mask = (torch.rand(b, tk, generator=g) < 0.8) if padded else None
    kwargs = dict(key_mask=key_mask, q_offset=q_offset, causal=causal)
    out, lse = block_sparse_attention_native(q, k, v, sel, **kwargs)
    ref, ref_lse = block_sparse_attention_naive(q, k, v, sel, **kwargs)
    # bf16: probabilities are rounded to bf16 for the P.V products (as fused bf16 attention does).
    assert_matches_naive(out, lse, ref, ref_lse, 1e-5 if dtype == torch.float32 else 1e-2)


@needs_native
def test_native_takes_strided_and_float16_inputs():
    q, k, v = make_qkv(1, 4, 2, 90, 90, 16, seed=9)
    sel = random_selection(1, 4, 90, 90, 16, 16, 0.5, seed=3)
    ref, ref_lse = block_sparse_attention_naive(q, k, v, sel)
    strided = torch.cat([k, k], dim=-1)[..., :16], torch.cat([v, v], dim=-1)[..., :16]
    out, lse = block_sparse_attention_native(q, *strided, sel)
    assert_matches_naive(out, lse, ref, ref_lse, 1e-5)
    half = [t.half() for t in (q, k, v)]
    out, lse = block_sparse_attention_native(*half, sel)
    ref, ref_lse = block_sparse_attention_naive(*half, sel)
    assert_matches_naive(out, lse, ref, ref_lse, 1e-3)


def test_without_the_kernel_auto_falls_back_to_gather(monkeypatch):
    monkeypatch.setattr(native, "_library", lambda: (None, "no C compiler (test)"))
    assert resolve_backend("auto", "cpu") == "gather"
    with pytest.raises(ValueError, match="native.*no C compiler"):
        resolve_backend("native", "cpu")
    q, k, v = make_qkv(1, 2, 1, 16, 16, 8)
    with pytest.raises(ValueError, match="no C compiler.*'gather'"):
        block_sparse_attention_native(q, k, v, random_selection(1, 2, 16, 16, 16, 16, 1.0, seed=0))


def test_a_failing_compiler_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGATTN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    lib, reason = native._library.__wrapped__()
    if "AVX-512" in reason or "x86-64" in reason:
        pytest.skip(reason)
    assert lib is None and "building the native kernel failed" in reason
    assert list(tmp_path.rglob("*.so")) == []  # nothing half-written is left to load
    with pytest.raises(ValueError, match="CPU tensors only"):
        resolve_backend("native", "cuda")


CPU_OPS = {"gather": block_sparse_attention_gather, "cpu": block_sparse_attention_cpu,
           "naive": block_sparse_attention_naive}
if native_available():
    CPU_OPS["native"] = block_sparse_attention_native


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [16, 64], ids=["D16", "D64"])  # native: D64 bf16 prefill takes the AMX tiles
@pytest.mark.parametrize("tq", [100, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("backend", sorted(CPU_OPS))
def test_unselected_values_never_reach_the_output(backend, tq, d, dtype, bad):
    # Tk = 100, bs = 16: the last block (keys 96..99) is partial, and gather used to read it as the window
    # ending at the cache end, keys 84..99; NaN / inf in block 5 (80..95, never selected) leaked as 0 * NaN.
    tk, bs, qbs = 100, 16, 1 if tq == 1 else 16
    q, k, v = make_qkv(1, 4, 2, tq, tk, d, dtype, seed=2)
    nqb, nkb = -(-tq // qbs), -(-tk // bs)
    mask = torch.ones(1, 4, nqb, nkb, dtype=torch.bool)
    mask[..., 5] = False
    mask[..., 1:3] = False
    sel = Selection.from_mask(mask, qbs, bs)
    ref, ref_lse = CPU_OPS[backend](q, k, v, sel)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, 80:96] = bad
    v_bad[:, :, 80:96] = bad
    k_bad[:, :, 16:48] = bad  # other unselected blocks too
    v_bad[:, :, 16:48] = bad
    out, lse = CPU_OPS[backend](q, k_bad, v_bad, sel)
    assert bool(torch.isfinite(out).all()), "a value of an unselected block reached the output"
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


@needs_native
@pytest.mark.parametrize("amx", ["1", "0"], ids=["amx-tiles", "avx512-bf16"])
def test_both_bf16_paths_match_naive(amx, monkeypatch):
    # LONGATTN_NATIVE_AMX=0 keeps bf16 on the AVX512-BF16 path (the one CPUs without AMX take).
    monkeypatch.setenv("LONGATTN_NATIVE_AMX", amx)
    q, k, v = make_qkv(1, 6, 2, 300, 300, 64, torch.bfloat16, seed=5)
    sel = random_selection(1, 6, 300, 300, 16, 16, 0.3, seed=6)
    out, lse = block_sparse_attention_native(q, k, v, sel)
    ref, ref_lse = block_sparse_attention_naive(q, k, v, sel)
    assert_matches_naive(out, lse, ref, ref_lse, 1e-2)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tq", [70, 1], ids=["prefill", "decode"])
def test_native_reads_a_transposed_projection_without_copying_it(dtype, tq):
    # The model's q is its projection [B, T, H, D] transposed to [B, H, T, D]: read at its strides. The output
    # is written [B, T, H, D] and returned as a [B, H, T, D] view, so the model's transpose back is free.
    q, k, v = make_qkv(2, 6, 2, tq, 90, 64, dtype, seed=8)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert tq == 1 or not q_t.is_contiguous()
    sel = random_selection(2, 6, tq, 90, 16 if tq > 1 else 1, 16, 0.5, seed=9)
    out, lse = block_sparse_attention_native(q_t, k, v, sel)
    ref, ref_lse = block_sparse_attention_native(q, k, v, sel)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    assert out.transpose(1, 2).is_contiguous()
