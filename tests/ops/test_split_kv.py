"""split_kv_attention (full and streaming KV heads apart, streaming heads compact) equals its reference and the
operator over the whole sequence; SplitKV's own checks and views."""

from __future__ import annotations

import pytest
import torch

from longattn.core.kv import SplitKV
from longattn.core.pattern import StepPattern
from longattn.core.selection import Selection
from longattn.ops.block_sparse import block_sparse_attention, split_kv_attention, split_kv_attention_reference
from tests.ops.common import make_qkv

BS = 16


def _split(k, v, stream_heads, sink_len, gap):
    """The whole-sequence ``k, v [B, Hkv, Tk, D]`` as a head-aware cache would hold them."""
    hkv, tk = k.shape[1], k.shape[2]
    full_heads = tuple(h for h in range(hkv) if h not in stream_heads)

    def compact(x):
        rows = x[:, list(stream_heads)]
        return torch.cat((rows[:, :, :sink_len], rows[:, :, sink_len + gap:]), dim=2)

    return SplitKV(
        kv_len=tk, num_kv_heads=hkv, block_size=BS, sink_tokens=4, window=32, full_heads=full_heads,
        full_keys=k[:, list(full_heads)] if full_heads else None, full_values=v[:, list(full_heads)] if full_heads else None,
        stream_heads=tuple(stream_heads), stream_keys=compact(k), stream_values=compact(v), sink_len=sink_len, gap=gap,
    )


def _selection(b, h, hkv, tq, tk, stream_heads, per_query, seed, key_mask=None):
    """Random blocks for the full heads, sinks + window (the static pattern) for the streaming heads."""
    qbs = 1 if tq == 1 else 16
    pattern = StepPattern.build(tq, tk, tk - tq, BS, qbs, 4, 32, key_mask)
    static = pattern.static_mask()  # [B or 1, 1, Qblk, Nblk]
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, h, static.shape[2], static.shape[3], generator=g) < 0.4) | static
    mask &= pattern.causal_mask()
    group = h // hkv
    for head in range(h):
        if head // group in stream_heads:
            mask[:, head] = static[:, 0]
    return Selection.from_mask(mask, qbs, BS)


@pytest.mark.parametrize("stream_heads", [(0, 2), (1,), (0, 1, 2, 3)], ids=["apart", "one", "all"])
@pytest.mark.parametrize("per_query", [True, False], ids=["per-query-head", "per-kv-head"])
@pytest.mark.parametrize(("tq", "padded"), [(48, False), (1, False), (48, True)], ids=["prefill", "decode", "padded"])
@pytest.mark.parametrize("backend", ["gather", "auto"])
def test_equals_the_reference_and_the_whole_sequence(stream_heads, per_query, tq, padded, backend):
    b, hq, hkv, tk, d = 2, 8, 4, 200, 32
    q, k, v = make_qkv(b, hq, hkv, tq, tk, d, seed=1)
    key_mask = None
    if padded:
        key_mask = torch.ones(b, tk, dtype=torch.bool)
        key_mask[1, :5] = False
    sink_len, gap = 16, 96  # the window of the first query starts at block 8 (128 >= 16 + 96)
    split = _split(k, v, stream_heads, sink_len, gap)
    selection = _selection(b, hq if per_query else hkv, hkv, tq, tk, stream_heads, per_query, seed=2, key_mask=key_mask)
    out, lse = split_kv_attention(q, split, selection, key_mask=key_mask, backend=backend)
    ref, ref_lse = split_kv_attention_reference(q, split, selection, key_mask=key_mask)
    whole, whole_lse = block_sparse_attention(q, k, v, selection, key_mask=key_mask, backend="naive")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_lse, whole_lse, rtol=1e-5, atol=1e-5)


def test_dense_marked_full_heads_go_through_sdpa():
    b, hq, hkv, tq, tk, d = 1, 8, 4, 32, 160, 32
    q, k, v = make_qkv(b, hq, hkv, tq, tk, d, seed=3)
    split = _split(k, v, (1, 2), 16, 64)
    sel = _selection(b, hq, hkv, tq, tk, (1, 2), True, seed=4)
    pattern = StepPattern.build(tq, tk, tk - tq, BS, 16, 4, 32)
    causal = pattern.causal_mask().expand(b, hq, -1, -1).clone()
    for head in (0, 1, 6, 7):  # KV heads 0 and 3 attend everything
        sel_mask = sel.to_mask(-(-tk // BS))
        sel_mask[:, head] = causal[:, head]
        sel = Selection.from_mask(sel_mask, 16, BS)
    dense = Selection(sel.indices, sel.counts, 16, BS, tuple(h in (0, 1, 6, 7) for h in range(hq)))
    out, lse = split_kv_attention(q, split, dense, backend="gather")
    ref, _ = split_kv_attention_reference(q, split, dense)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.isnan(lse[:, [0, 1, 6, 7]]).all() and not torch.isnan(lse[:, 2:6]).any()


def test_a_streaming_head_that_selects_a_dropped_block_is_refused():
    b, hq, hkv, tq, tk, d = 1, 4, 2, 1, 160, 32
    q, k, v = make_qkv(b, hq, hkv, tq, tk, d, seed=5)
    split = _split(k, v, (1,), 16, 64)
    mask = torch.zeros(b, hkv, 1, 10, dtype=torch.bool)
    mask[..., [0, 3, 9]] = True  # block 3 lies in the gap [1, 5)
    with pytest.raises(RuntimeError, match=r"selected a key block in \[1, 5\)"):
        split_kv_attention(q, split, Selection.from_mask(mask, 1, BS))


def test_logical_view_and_checks():
    q, k, v = make_qkv(1, 4, 2, 1, 100, 16, seed=6)
    split = _split(k, v, (0,), 16, 32)
    assert split.shape == (1, 2, 100, 16) and split.stream_len == 68
    keys, values = split.logical()
    torch.testing.assert_close(keys[:, 1], k[:, 1])
    torch.testing.assert_close(keys[:, 0, :16], k[:, 0, :16])
    torch.testing.assert_close(values[:, 0, 48:], v[:, 0, 48:])
    assert torch.isnan(keys[:, 0, 16:48]).all()
    mask = torch.arange(100).view(1, -1) % 3 > 0
    assert torch.equal(split.stream_key_mask(mask), torch.cat((mask[:, :16], mask[:, 48:]), 1))
    with pytest.raises(ValueError, match="must split the 2 KV heads"):
        SplitKV(100, 2, BS, 4, 32, (0,), k[:, :1], v[:, :1], (0,), k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="whole blocks"):
        SplitKV(100, 2, BS, 4, 32, (1,), k[:, 1:], v[:, 1:], (0,), k[:, :1, :90], v[:, :1, :90], sink_len=4, gap=10)
    with pytest.raises(ValueError, match=r"stream_keys must be \[B, 1, 68, D\]"):
        SplitKV(100, 2, BS, 4, 32, (1,), k[:, 1:], v[:, 1:], (0,), k[:, :1], v[:, :1], sink_len=16, gap=32)
