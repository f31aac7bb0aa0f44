"""Fused block scoring + top-k: the Triton kernel against naive (plain PyTorch), and the methods that use it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longattn
from longattn.core.index import BlockIndex
from longattn.methods import SelectionContext
from longattn.ops.block_topk import block_topk, block_topk_naive, fused_topk_available
from longattn.ops.block_topk import native as topk_native
from tests.ops.gpu_helpers import DEVICE, TRITON_MISSING, requires_cuda

# (B, Hq, Hkv, Tq, D, Nblk, qbs, top_k)
SHAPES = [
    (1, 4, 2, 64, 16, 20, 16, 4),
    (2, 4, 2, 33, 32, 50, 16, 8),  # Tq not a multiple of the query block
    (1, 8, 2, 1, 64, 150, 1, 16),  # decode: blocks split across programs
    (1, 4, 1, 48, 128, 90, 16, 5),  # top_k not a power of two
]


def _inputs(shape, kind, padded, seed=0):
    b, hq, hkv, tq, d, nkb, qbs, k = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g)
    s = torch.randn(b, hkv, nkb, 1 if kind == "mean" else 2, d, generator=g)
    if kind == "minmax":
        s = torch.stack([s.amin(3), s.amax(3)], dim=3)
    nqb = -(-tq // qbs)
    limit = torch.randint(nkb // 2, nkb + 1, (nqb,), generator=g)
    sink_lo, sink_hi = torch.tensor([0] * b), torch.tensor([2] * b)
    has_key = (torch.rand(b, nkb, generator=g) > 0.2) if padded else None
    args = [q, s, kind, k, qbs, limit, sink_lo, sink_hi, has_key]
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


def test_naive_keeps_the_best_retrievable_blocks():
    q = torch.zeros(1, 1, 1, 4)
    q[..., 0] = 1.0
    s = torch.zeros(1, 1, 8, 1, 4)
    s[0, 0, :, 0, 0] = torch.tensor([9.0, 1, 5, 7, 3, 8, 6, 2])
    ids = block_topk_naive(q, s, "mean", 3, 1, torch.tensor([6]), torch.tensor([0]), torch.tensor([1]))
    assert ids.flatten().tolist() == [5, 3, 2]  # block 0 is a sink, 6 and 7 are in the window
    has_key = torch.ones(1, 8, dtype=torch.bool)
    has_key[0, 5] = False
    ids = block_topk_naive(q, s, "mean", 6, 1, torch.tensor([6]), torch.tensor([0]), torch.tensor([1]), has_key)
    assert ids.flatten().tolist() == [3, 2, 4, 1, -1, -1]


def test_bad_arguments_raise():
    args = _inputs(SHAPES[0], "mean", False)
    with pytest.raises(ValueError, match="kind must be one of"):
        block_topk(*args[:2], "max", *args[3:])
    with pytest.raises(ValueError, match="'reference' was renamed to 'naive'"):
        block_topk(*args, backend="reference")
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        block_topk(*args[:3], 0, *args[4:])
    with pytest.raises(ValueError, match=r"limit must be \[Qblk=4\]"):
        block_topk(*args[:5], args[5][:2], *args[6:])
    with pytest.raises(ValueError, match="R>=2"):
        block_topk(*args[:2], "minmax", *args[3:])
    with pytest.raises(ValueError, match="backend must be one of"):
        block_topk(*args, backend="cuda-magic")


@pytest.mark.parametrize("padded", [False, True], ids=["all-keys", "padded"])
@pytest.mark.parametrize("kind", ["mean", "minmax"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}-H{s[1]}-HKV{s[2]}-T{s[3]}-D{s[4]}-N{s[5]}-k{s[7]}" for s in SHAPES])
def test_triton_equals_naive(shape, kind, padded):
    pytest.importorskip("triton", reason=TRITON_MISSING)
    from longattn.ops.block_topk.triton_kernel import block_topk_triton

    args = _inputs(shape, kind, padded)
    assert torch.equal(block_topk_triton(*args), block_topk_naive(*args))


def test_non_finite_scores_are_never_picked():
    pytest.importorskip("triton", reason=TRITON_MISSING)
    from longattn.ops.block_topk.triton_kernel import block_topk_triton

    args = _inputs(SHAPES[0], "minmax", False, seed=5)
    s = args[1].clone()
    s[0, 0, 7, 1, 0] = float("nan")  # NaN bound
    s[0, 0, 9, 0, :] = float("-inf")  # 0 * inf in a min/max bound
    s[0, 0, 9, 1, :] = float("inf")
    args[1] = s
    args[3] = 20  # room for every block: only finite scores may fill it
    ref = block_topk_naive(*args)
    assert torch.equal(block_topk_triton(*args), ref)
    heads_of_kv0 = ref[0, :2]
    assert not bool((heads_of_kv0 == 7).any()) and not bool((heads_of_kv0 == 9).any())


@pytest.mark.parametrize("splits", [1, 3])
def test_split_blocks_equal_one_program(splits):
    pytest.importorskip("triton", reason=TRITON_MISSING)
    from longattn.ops.block_topk.triton_kernel import block_topk_launch

    args = _inputs(SHAPES[2], "mean", True, seed=3)
    assert torch.equal(block_topk_launch(*args, num_splits=splits), block_topk_naive(*args))


@requires_cuda
def test_full_size_on_gpu():
    from longattn.ops.block_topk.triton_kernel import block_topk_triton

    for shape in [(1, 32, 8, 4096, 128, 2048, 16, 32), (1, 32, 8, 1, 128, 65536, 1, 64)]:
        for kind in ("mean", "minmax"):
            args = _inputs(shape, kind, False)
            a, r = block_topk_triton(*args), block_topk_naive(*args)
            # Same sets (float reduction order may swap near-ties): compare sorted ids, allow a sliver.
            same = (a.sort(-1).values == r.sort(-1).values).float().mean()
            assert same > 0.999


# ------------------------------------------------------------------ the methods' fused selection path

METHOD_CASES = [("moba", {"block_size": 16, "top_k": 2, "window": 32}), ("quest", {"block_size": 16, "top_k": 2, "window": 32})]


def _select_both(name, config, tq, tk, padded, topk_backend):
    method = longattn.get_method(name, sink_tokens=20, **config)
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 4, tq, 16, generator=g), torch.randn(2, 2, tk, 16, generator=g)
    key_mask = None
    if padded:
        key_mask = torch.ones(2, tk, dtype=torch.bool)
        key_mask[1, :37] = False
    index = BlockIndex(method.block_size, method.summariser())
    summaries = index.update(k, 0, q=q)
    ctx = SelectionContext(kv_len=tk, q_offset=tk - tq, layer=0, num_kv_heads=2, key_mask=key_mask, keys=k)
    plain = method.select(q, summaries, ctx)
    fused = method.fused_select(q, summaries, ctx, backend=topk_backend)
    return method, plain, fused, tk


@pytest.mark.parametrize("topk_backend", ["naive", "native", "triton"])
@pytest.mark.parametrize("padded", [False, True], ids=["all-keys", "padded"])
@pytest.mark.parametrize("tq,tk", [(120, 120), (1, 301), (40, 301)], ids=["prefill", "decode", "chunk"])
@pytest.mark.parametrize("name,config", METHOD_CASES, ids=[c[0] for c in METHOD_CASES])
def test_fused_selection_equals_the_methods_own(name, config, tq, tk, padded, topk_backend):
    if topk_backend == "triton":
        pytest.importorskip("triton", reason=TRITON_MISSING)
    if topk_backend == "native" and not topk_native.native_topk_available():
        pytest.skip(topk_native.native_topk_unavailable_reason())
    method, plain, fused, tk = _select_both(name, config, tq, tk, padded, topk_backend)
    nkb = -(-tk // method.block_size)
    assert torch.equal(fused.to_mask(nkb), plain.to_mask(nkb))
    assert torch.equal(fused.counts, plain.counts)
    assert (fused.query_block_size, fused.kv_block_size) == (plain.query_block_size, plain.kv_block_size)
    fused.validate(tq, tk, 4, 2, 2)
    # Guard: the budget really leaves blocks out.
    assert int(fused.counts[..., -1].max()) < nkb


def test_methods_with_a_fused_score_select_through_block_topk():
    # On CPU backends through its naive path (same Selection, no mask to sort); on triton through the kernel.
    moba = longattn.get_method("moba")
    ctx = SelectionContext(kv_len=64, q_offset=0, layer=0, num_kv_heads=1)
    assert moba.uses_fused_topk(ctx)
    assert not moba.uses_fused_topk(SelectionContext(kv_len=64, q_offset=0, layer=0, num_kv_heads=1,
                                                     reposition=object()))  # type: ignore[arg-type]
    ctx.backend = "triton"
    assert moba.uses_fused_topk(ctx) == fused_topk_available()
    assert not longattn.get_method("moba", share_kv_heads=True).uses_fused_topk(ctx)
    assert not longattn.get_method("longheads").uses_fused_topk(ctx)  # no fused score kind

    # The capability is declared, not inferred: a subclass that changes the score says so with fused_score.
    class Shifted(type(moba)):
        fused_score = None

        def score(self, q, summaries):
            return super().score(q, summaries) + 1.0

    class Renamed(type(moba)):  # same score: keeps the fused selection it inherits
        pass

    assert not Shifted().uses_fused_topk(ctx)
    assert Renamed().uses_fused_topk(ctx) == moba.uses_fused_topk(ctx)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["moba", "quest"]), bs=st.sampled_from([4, 8, 16, 32]), qbs=st.sampled_from([1, 4, 16, 64]),
    window=st.integers(0, 100), sinks=st.integers(0, 40), top_k=st.integers(0, 6), tk=st.integers(1, 260),
    q_frac=st.floats(0.0, 1.0), pad=st.integers(0, 50), seed=st.integers(0, 1000),
)
def test_fused_selection_equals_the_methods_own_on_random_geometry(name, bs, qbs, window, sinks, top_k, tk, q_frac,
                                                                   pad, seed):
    method = longattn.get_method(name, block_size=bs, query_block_size=qbs, window=window, sink_tokens=sinks,
                                 top_k=top_k)
    tq = max(1, round(tk * q_frac))
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 4, tq, 8, generator=g), torch.randn(2, 2, tk, 8, generator=g)
    key_mask = None
    if pad:
        key_mask = torch.ones(2, tk, dtype=torch.bool)
        key_mask[1, :min(pad, tk - 1)] = False
    summaries = BlockIndex(bs, method.summariser()).update(k, 0, q=q)
    ctx = SelectionContext(kv_len=tk, q_offset=tk - tq, layer=0, num_kv_heads=2, key_mask=key_mask, keys=k)
    plain, fused = method.select(q, summaries, ctx), method.fused_select(q, summaries, ctx, backend="naive")
    nkb = -(-tk // bs)
    assert torch.equal(fused.to_mask(nkb), plain.to_mask(nkb)) and torch.equal(fused.counts, plain.counts)
    fused.validate(tq, tk, 4, 2, 2)


# --- backend "native" (C kernel, AVX-512 CPUs) against naive -------------------------------------------------

needs_native_topk = pytest.mark.skipif(not topk_native.native_topk_available(),
                                       reason=topk_native.native_topk_unavailable_reason())


@needs_native_topk
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("padded", [False, True], ids=["all-keys", "padded"])
@pytest.mark.parametrize("kind", ["mean", "minmax"])
@pytest.mark.parametrize("shape", SHAPES + [(2, 6, 3, 200, 64, 70, 16, 32), (1, 3, 3, 1, 16, 33, 1, 40)],
                         ids=lambda s: f"B{s[0]}-H{s[1]}-HKV{s[2]}-T{s[3]}-D{s[4]}-N{s[5]}-k{s[7]}")
def test_native_equals_naive(shape, kind, padded, dtype):
    # The extra shapes: GQA groups of 2 with rows not a multiple of 8 and top_k = 32 (moba's default), and
    # decode with more slots than retrievable blocks (the -1 padding) and a block count off the 32-lane grid.
    args = _inputs(shape, kind, padded, seed=11)
    args[0] = args[0].to(dtype)
    assert torch.equal(topk_native.block_topk_native(*args), block_topk_naive(*args))


@needs_native_topk
@pytest.mark.parametrize("tq", [64, 1], ids=["prefill", "decode"])  # transposed summaries / in-kernel columns
def test_native_never_picks_non_finite_scores(tq):
    shape = (1, 4, 2, tq, 16, 20, 16 if tq > 1 else 1, 20)
    args = _inputs(shape, "minmax", False, seed=5)
    s = args[1].clone()
    s[0, 0, 7, 1, 0] = float("nan")  # NaN bound
    s[0, 0, 9, 0, :] = float("-inf")  # 0 * inf in a min/max bound
    s[0, 0, 9, 1, :] = float("inf")
    args[1] = s
    q = args[0].clone()
    q[0, 3, -1, 2] = float("nan")  # one NaN query element: its head scores NaN on its rows' blocks
    args[0] = q
    ref = block_topk_naive(*args)
    assert torch.equal(topk_native.block_topk_native(*args), ref)
    assert not bool((ref[0, :2] == 7).any()) and not bool((ref[0, :2] == 9).any())


@needs_native_topk
def test_native_breaks_ties_to_the_lower_block():
    q = torch.ones(1, 1, 1, 4)
    s = torch.zeros(1, 1, 8, 1, 4)
    s[0, 0, [2, 4, 5], 0, 0] = 1.0  # three equal scores; 3 slots for 5 candidates after the sink
    ids = topk_native.block_topk_native(q, s, "mean", 3, 1, torch.tensor([8]), torch.tensor([0]), torch.tensor([1]))
    assert ids.flatten().tolist() == [2, 4, 5]
    ids = topk_native.block_topk_native(q, s, "mean", 4, 1, torch.tensor([8]), torch.tensor([0]), torch.tensor([1]))
    assert ids.flatten().tolist() == [2, 4, 5, 1]


def test_native_topk_falls_back_cleanly(monkeypatch):
    args = _inputs(SHAPES[0], "mean", False)
    monkeypatch.setattr(topk_native, "_library", lambda: (None, "no C compiler (test)"))
    assert torch.equal(block_topk(*args), block_topk_naive(*args))  # auto keeps naive
    with pytest.raises(ValueError, match="'native' is unavailable: no C compiler.*'naive'"):
        block_topk(*args, backend="native")


@needs_native_topk
def test_moba_on_the_native_backend_selects_through_the_native_top_k(monkeypatch):
    import longattn.ops.block_topk as topk_ops

    calls = []
    real = topk_ops.block_topk_native
    monkeypatch.setattr(topk_ops, "block_topk_native", lambda *a: calls.append(1) or real(*a))
    method, plain, fused, tk = _select_both("moba", METHOD_CASES[0][1], 120, 120, True, "auto")
    assert calls == []  # the context's backend is gather: the PyTorch path
    q, k = torch.randn(2, 4, 120, 16), torch.randn(2, 2, 120, 16)
    summaries = BlockIndex(method.block_size, method.summariser()).update(k, 0, q=q)
    ctx = SelectionContext(kv_len=120, q_offset=0, layer=0, num_kv_heads=2, keys=k, backend="native")
    sel = method.select(q, summaries, ctx)
    assert calls == [1]
    ctx.backend = "gather"
    assert torch.equal(method.select(q, summaries, ctx).to_mask(8), sel.to_mask(8))


@needs_native_topk
@pytest.mark.parametrize("kind", ["mean", "minmax"])
def test_native_reads_a_transposed_projection(kind):
    args = _inputs((2, 6, 3, 50, 32, 40, 16, 8), kind, True, seed=4)
    q_t = args[0].transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_t.is_contiguous()
    assert torch.equal(topk_native.block_topk_native(q_t, *args[1:]), block_topk_naive(*args))
