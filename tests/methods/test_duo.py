"""duo and razor: which heads retrieve, what streaming heads keep, the compensation token, and their errors."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.core.profile import HeadProfile, model_identity
from longattn.methods import SelectionContext
from longattn.ops import block_sparse_attention
from tests.conftest import tiny_model
from tests.methods.helpers import select, token_mask


def _profile(retrieval: list[list[float]]) -> HeadProfile:
    ident = model_identity(tiny_model("llama"))  # 2 layers x 4 query heads, 2 KV heads
    zeros = [[0.0] * 4 for _ in range(2)]
    return HeadProfile(model=ident, settings={}, retrieval=retrieval, streaming=zeros, hidden_sink_mass=zeros,
                       initial_sink_mass=zeros)


SCORES = [[0.0, 0.3, 0.0, 0.05], [0.9, 0.0, 0.0, 0.0]]  # KV-head maxima: [[0.3, 0.05], [0.9, 0.0]]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"threshold": 0.2}, {0: {0}, 1: {0}}),
        ({"threshold": 0.01}, {0: {0, 1}, 1: {0}}),
        ({"retrieval_share": 0.25}, {1: {0}}),
        ({"retrieval_share": 0.5}, {0: {0}, 1: {0}}),
        ({"threshold": 0.2, "granularity": "query_head"}, {0: {1}, 1: {0}}),
        ({"retrieval_share": 0.25, "granularity": "query_head"}, {0: {1}, 1: {0}}),
    ],
)
def test_profile_chooses_the_highest_scoring_heads(config, expected):
    method = longattn.get_method("duo", profile=_profile(SCORES), **config)
    assert method.retrieval_units() == expected


def test_streaming_heads_keep_only_sinks_and_window_and_retrieval_heads_everything():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 160, 8, generator=g), torch.randn(1, 2, 160, 8, generator=g)
    method = longattn.get_method("duo", retrieval_heads=((0, 1),), block_size=16, window=32, sink_tokens=16)
    mask = token_mask(select(method, q, k), 160)[0, :, -1]  # last query block: [Hq, Tk]
    assert mask[2:].all() and mask[2:].shape[-1] == 160  # KV head 1 serves query heads 2, 3: all keys
    for h in (0, 1):
        kept = mask[h].nonzero().flatten()
        assert set(kept.tolist()) == set(range(16)) | set(range(112, 160))


def test_query_head_unit_chooses_single_heads():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 160, 8, generator=g), torch.randn(1, 2, 160, 8, generator=g)
    method = longattn.get_method("duo", retrieval_heads=((0, 3),), granularity="query_head", block_size=16, window=16)
    full = token_mask(select(method, q, k), 160)[0, :, -1].all(-1)
    assert full.tolist() == [False, False, False, True]


def test_selector_runs_on_retrieval_heads_only():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 256, 8, generator=g), torch.randn(1, 2, 256, 8, generator=g)
    moba = longattn.get_method("moba", block_size=16, top_k=2, window=16)
    method = longattn.get_method("duo", retrieval_heads=((0, 0),), block_size=16, window=16, selector=moba)
    by_spec = longattn.get_method("duo", retrieval_heads=((0, 0),), block_size=16, window=16,
                                  selector={"name": "moba", "top_k": 2, "window": 16})
    assert by_spec.selector == moba  # a spec takes duo's block_size
    assert select(method, q, k).dense_heads is None  # the retrieval heads select, they are not dense
    ours, theirs = select(method, q, k).to_mask(16), select(moba, q, k).to_mask(16)
    assert torch.equal(ours[:, :2], theirs[:, :2])
    static = select(longattn.get_method("streaming", block_size=16, window=16), q, k).to_mask(16)
    assert torch.equal(ours[:, 2:], static.expand(-1, 4, -1, -1)[:, 2:])


def test_kv_cache_tokens_counts_full_and_streaming_heads():
    method = longattn.get_method("duo", retrieval_heads=((0, 1),), block_size=16, window=64, sink_tokens=4)
    # Layer 0: one full KV head (1000) + one streaming (16 sinks + 64 window + 16 open block); layer 1: two streaming.
    assert method.kv_cache_tokens(1000, 2, 4, 2) == 1000 + 96 + 2 * 96
    assert method.kv_cache_tokens(50, 2, 4, 2) == 4 * 50


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({}, "exactly one of profile"),
        ({"retrieval_heads": ((0, 1),), "threshold": 0.1}, "leave them unset"),
        ({"retrieval_heads": ((0, -1),)}, "non-negative"),
        ({"retrieval_heads": ((0, 1),), "granularity": "layer"}, "granularity must be one of"),
        ({"profile": "no/such/profile.json", "threshold": 0.1}, "no HeadProfile"),
        ({"retrieval_heads": ((0, 1),), "selector": {"name": "moba", "block_size": 32}}, "must equal"),
        ({"retrieval_heads": ((0, 1),), "selector": "streaming"}, "scored method"),
        ({"retrieval_heads": ((0, 1),), "selector": 7}, "selector must be a Method"),
    ],
)
def test_bad_config_raises(config, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        longattn.get_method("duo", **config)


@pytest.mark.parametrize(("config", "match"), [({"threshold": 1.5}, r"\[0, 1\]"), ({"retrieval_share": 0.0}, r"\(0, 1\]"),
                                               ({}, "exactly one of threshold"),
                                               ({"retrieval_share": "25%"}, "must be a number")])
def test_profile_choice_needs_one_valid_rule(config, match):
    with pytest.raises(ValueError, match=match):
        longattn.get_method("duo", profile=_profile(SCORES), **config)


def test_heads_that_do_not_exist_are_refused_on_apply():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="does not exist"):
        longattn.apply(model, longattn.get_method("duo", retrieval_heads=((5, 0),)))
    with pytest.raises(ValueError, match="does not exist"):
        longattn.apply(model, longattn.get_method("duo", retrieval_heads=((0, 2),)))  # 2 KV heads only


# --------------------------------------------------------------------------------------------------- razor


def _razor_reference(q, k, v, window, sinks, bs, scale):
    """Dense loop: each streaming-head row attends its sinks, its window and one token (mean k, mean v) of
    the whole blocks in between, weighted by their count. ``[B, Hq, Tq, D]``."""
    b, hq, t, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros_like(q)
    for h in range(hq):
        kk, vv = k[0, h // g], v[0, h // g]
        for i in range(t):
            lo = min(max(i - window, 0) // bs, i // bs) * bs  # first window block, as Method.static_mask
            sink_end = -(-sinks // bs) * bs
            keep = [j for j in range(i + 1) if j < sink_end or j >= lo]
            drop = [j for j in range(i + 1) if sink_end <= j < lo]
            scores = (kk[keep] @ q[0, h, i]) * scale
            values = vv[keep]
            if drop:
                mean_k, mean_v = kk[drop].mean(0), vv[drop].mean(0)
                scores = torch.cat([scores, (mean_k @ q[0, h, i] * scale + torch.log(torch.tensor(len(drop)))).view(1)])
                values = torch.cat([values, mean_v.view(1, -1)])
            out[0, h, i] = scores.softmax(0) @ values
    return out


def test_razor_compensation_equals_a_dense_loop_reference():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 100, 8, generator=g), torch.randn(1, 1, 100, 8, generator=g),
               torch.randn(1, 1, 100, 8, generator=g))
    method = longattn.get_method("razor", retrieval_heads=(), block_size=8, window=16, sink_tokens=4)
    sel = select(method, q, k)
    out, lse = block_sparse_attention(q, k, v, sel, 0.35)
    ctx = SelectionContext(kv_len=100, q_offset=0, layer=0, num_kv_heads=1, keys=k)
    ours = method.adjust_output(out, lse, q, k, v, sel, ctx, 0.35)
    torch.testing.assert_close(ours, _razor_reference(q, k, v, 16, 4, 8, 0.35), atol=1e-5, rtol=1e-4)
    assert (ours - out).abs().max() > 1e-3  # the token changes the streaming rows


def test_razor_leaves_retrieval_heads_alone():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 4, 100, 8, generator=g), torch.randn(1, 2, 100, 8, generator=g),
               torch.randn(1, 2, 100, 8, generator=g))
    method = longattn.get_method("razor", retrieval_heads=((0, 1),), block_size=8, window=16)
    sel = select(method, q, k)
    out, lse = block_sparse_attention(q, k, v, sel)
    ctx = SelectionContext(kv_len=100, q_offset=0, layer=0, num_kv_heads=2, keys=k)
    ours = method.adjust_output(out, lse, q, k, v, sel, ctx, 8**-0.5)
    torch.testing.assert_close(ours[:, 2:], out[:, 2:])
    assert (ours[:, :2] - out[:, :2]).abs().max() > 1e-3


def test_razor_is_closer_to_dense_than_duo_on_the_tiny_model():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        errors = {}
        for name in ("duo", "razor"):
            method = longattn.get_method(name, retrieval_heads=((0, 1),), block_size=16, window=16)
            with longattn.apply(model, method):
                errors[name] = float((model(ids).logits - ref).abs().mean())
    assert errors["razor"] < errors["duo"] / 2


def test_share_breaks_retrieval_ties_by_lowest_streaming_score():
    ident = model_identity(tiny_model("llama"))
    zeros = [[0.0] * 4 for _ in range(2)]
    retrieval = [[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]
    streaming = [[0.9, 0.9, 0.9, 0.2], [0.1, 0.9, 0.95, 0.95]]  # KV minima: [[0.9, 0.2], [0.1, 0.95]]
    profile = HeadProfile(model=ident, settings={}, retrieval=retrieval, streaming=streaming,
                          hidden_sink_mass=zeros, initial_sink_mass=zeros)
    method = longattn.get_method("duo", profile=profile, retrieval_share=0.5)
    assert method.retrieval_units() == {1: {0}, 0: {1}}


@pytest.mark.parametrize(("tq", "padded"), [(130, False), (40, False), (1, False), (130, True)],
                         ids=["prefill", "chunked", "decode", "padded"])
@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_retrieval_heads_are_dense_heads_and_equal_the_operator_over_every_block(tq, padded, granularity):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, tq, 8, generator=g), torch.randn(2, 2, 130, 8, generator=g),
               torch.randn(2, 2, 130, 8, generator=g))
    key_mask = None
    if padded:
        key_mask = torch.ones(2, 130, dtype=torch.bool)
        key_mask[1, :7] = False
    method = longattn.get_method("duo", retrieval_heads=((0, 1),), block_size=16, window=16, granularity=granularity)
    ctx = SelectionContext(kv_len=130, q_offset=130 - tq, layer=0, num_kv_heads=2, key_mask=key_mask, keys=k)
    sel = method.select(q, None, ctx)
    dense = [False, False, True, True] if granularity == "kv_head" else [False, True, False, False]
    assert list(sel.dense_heads) == dense
    fast, lse = block_sparse_attention(q, k, v, sel, 0.3, key_mask=key_mask)  # dense heads through SDPA
    ref, ref_lse = block_sparse_attention(q, k, v, sel.without_dense_heads(), 0.3, key_mask=key_mask)
    rows = torch.ones(2, 4, tq, 1, dtype=torch.bool)
    if padded:  # padding query rows are undefined in SDPA and zeroed by both paths; compare the valid ones
        rows[1, :, : max(0, 7 - (130 - tq))] = False
    torch.testing.assert_close(fast * rows, ref * rows, atol=1e-5, rtol=1e-4)
    streaming = [not d for d in dense]
    torch.testing.assert_close(lse[:, streaming], ref_lse[:, streaming])  # streaming heads keep the operator's lse
    assert torch.isnan(lse[:, dense]).all()


def test_a_layer_without_retrieval_heads_marks_none():
    q, k = torch.randn(1, 4, 32, 8), torch.randn(1, 2, 32, 8)
    ctx = SelectionContext(kv_len=32, q_offset=0, layer=0, num_kv_heads=2, keys=k)
    method = longattn.get_method("duo", retrieval_heads=((1, 1),), block_size=16)
    assert method.select(q, None, ctx).dense_heads is None
