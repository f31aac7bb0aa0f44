"""Every method on a tiny random Llama: full budget == sdpa, small budget != sdpa; plus property tests."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longattn
from longattn.core.index import BlockIndex
from longattn.methods import SelectionContext
from longattn.ops import block_sparse_attention
from tests.cases import CASES, Case
from tests.conftest import tiny_model
from tests.methods.helpers import select, token_mask

LENGTH = 200  # prompt tokens: 13 blocks of 16, not a multiple of any block size used


def _prompt(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def reference(model):
    ids = _prompt()
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    return ids, logits, generated


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_full_budget_equals_sdpa_in_prefill_and_decode(case: Case, model, reference):
    ids, ref_logits, ref_generated = reference
    method = longattn.get_method(case.name, **{**case.config, **case.full})
    with torch.no_grad(), longattn.apply(model, method) as session:
        logits = model(ids).logits
        assert session.prefill_stats.density == pytest.approx(1.0)
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(generated, ref_generated)
    # Decode logits, step by step, with the model's own cache.
    tokens = [generated[:, LENGTH + i : LENGTH + i + 1] for i in range(5)]
    torch.testing.assert_close(_decode_logits(model, ids, tokens, method), _decode_logits(model, ids, tokens, None),
                               atol=1e-4, rtol=1e-4)


def _decode_logits(model, ids, tokens, method):
    """Last-position logits of a prefill followed by one decode step per token: ``[steps + 1, vocab]``."""
    with torch.no_grad(), (longattn.apply(model, method) if method else contextlib.nullcontext()):
        out = model(ids, use_cache=True)
        rows = [out.logits[0, -1]]
        for token in tokens:
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            rows.append(out.logits[0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("case", [c for c in CASES if c.sparse], ids=[c.id for c in CASES if c.sparse])
def test_small_budget_differs_from_sdpa(case: Case, model, reference):
    ids, ref_logits, generated = reference
    method = longattn.get_method(case.name, **case.config)
    if not case.sparse_prefill:  # eviction: prefill is dense by design, decode must not be
        tokens = [generated[:, LENGTH + i : LENGTH + i + 1] for i in range(5)]
        got, want = _decode_logits(model, ids, tokens, method), _decode_logits(model, ids, tokens, None)
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
        assert (got[1:] - want[1:]).abs().max() > 1e-3
        return
    with torch.no_grad(), longattn.apply(model, method) as session:
        logits = model(ids).logits
    assert session.prefill_stats.density < 0.9
    assert (logits - ref_logits).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_apply_restores_model_on_exit_and_on_error(case: Case, model):
    method = longattn.get_method(case.name, **case.config)
    before = model.config._attn_implementation
    with longattn.apply(model, method):
        assert model.config._attn_implementation == "longattn"
    assert model.config._attn_implementation == before
    with pytest.raises(KeyError):
        with longattn.apply(model, method):
            raise KeyError("boom")
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, "_longattn_session") for m in model.modules())


# --------------------------------------------------------------------- property tests on the operator level


@settings(max_examples=30, deadline=None)
@given(
    case=st.sampled_from([c for c in CASES if c.sparse]),
    tk=st.integers(1, 300),
    decode=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_full_budget_is_dense_and_causal(case, tk, decode, seed):
    g = torch.Generator().manual_seed(seed)
    tq = 1 if decode else tk
    q = torch.randn(1, 4, tq, 8, generator=g)
    k = torch.randn(1, 2, tk, 8, generator=g)
    v = torch.randn(1, 2, tk, 8, generator=g)
    full = longattn.get_method(case.name, **{**case.config, **case.full})
    sel = select(full, q, k)
    out, _ = block_sparse_attention(q, k, v, sel)
    dense_sel = select(longattn.get_method("dense", block_size=full.block_size), q, k)
    dense, _ = block_sparse_attention(q, k, v, dense_sel)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-4)
    # Causality of the selection: a query block's blocks never start after its last query.
    qbs = sel.query_block_size
    last = (tk - tq + torch.arange(sel.num_q_blocks) * qbs + qbs - 1).clamp(max=tk - 1)
    starts = torch.where(sel.indices >= 0, sel.indices * full.block_size, torch.zeros_like(sel.indices))
    assert bool((starts <= last.view(1, 1, -1, 1)).all())


CAUSAL = [c for c in CASES if c.sparse and c.causal_selection]


@pytest.mark.parametrize("case", CAUSAL, ids=[c.id for c in CAUSAL])
def test_future_keys_do_not_change_past_outputs(case):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 256, 8, generator=g)
    k = torch.randn(1, 2, 256, 8, generator=g)
    v = torch.randn(1, 2, 256, 8, generator=g)
    method = longattn.get_method(case.name, **case.config)
    out, _ = block_sparse_attention(q, k, v, select(method, q, k))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 128:] = torch.randn(1, 2, 128, 8, generator=g)
    v2[:, :, 128:] = torch.randn(1, 2, 128, 8, generator=g)
    q2 = q.clone()
    q2[:, :, 128:] = torch.randn(1, 4, 128, 8, generator=g)
    out2, _ = block_sparse_attention(q2, k2, v2, select(method, q2, k2))
    # Query blocks end at multiples of 16 or 32, so rows before 128 lie in blocks that end by 128.
    torch.testing.assert_close(out[:, :, :128], out2[:, :, :128])


def test_shared_kv_heads_selects_per_kv_head():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    shared = select(longattn.get_method("moba", block_size=16, top_k=1, window=0, share_kv_heads=True), q, k)
    per_head = select(longattn.get_method("moba", block_size=16, top_k=1, window=0), q, k)
    assert shared.num_heads == 2 and per_head.num_heads == 4


# --------------------------------------------------------------------------------------- registry and config


def test_registry_lists_every_method_and_each_has_a_case():
    expected = {"dense", "streaming", "moba", "quest", "infllm", "longheads", "dhsa", "hip", "routing",
                "flexprefill", "retrieval", "duo", "razor", "act", "blockmax", "snapkv", "tova"}
    assert set(longattn.list_methods()) == expected
    assert {c.name for c in CASES} == expected
    for name in expected:
        cls = longattn.methods.method_class(name)
        assert cls.name == name and "http" in cls.paper and cls.__doc__


@pytest.mark.parametrize("case", [c for c in CASES if c.sparse], ids=[c.id for c in CASES if c.sparse])
def test_selection_is_deterministic(case):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 150, 8, generator=g), torch.randn(1, 2, 150, 8, generator=g)
    method = longattn.get_method(case.name, **case.config)
    first, second = select(method, q, k), select(longattn.get_method(case.name, **case.config), q, k)
    assert torch.equal(first.indices, second.indices) and torch.equal(first.counts, second.counts)


# streaming never looks outside its window; duo and razor choose by head, not by content (tests/methods/test_duo.py)
RETRIEVING = [c for c in CASES if c.sparse and c.name not in ("streaming", "duo", "razor")]


@pytest.mark.parametrize("kv_head", [0, 1])
@pytest.mark.parametrize("case", RETRIEVING, ids=[c.id for c in RETRIEVING])
def test_retrieves_the_planted_block_through_the_right_kv_head(case, kv_head):
    """Keys 48..63 of one KV head match the last queries of that head's query group (GQA: heads 2g, 2g+1)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 160, 16, generator=g) * 0.1
    k = torch.randn(1, 2, 160, 16, generator=g) * 0.1
    direction = torch.randn(16, generator=g)
    group = [2 * kv_head, 2 * kv_head + 1]
    q[:, group, -16:] += direction
    k[:, kv_head, 48:64] += direction
    method = longattn.get_method(case.name, **case.config)
    sel = select(method, q, k)
    tokens = token_mask(sel, 160)  # [B, H, Qblk, Tk]
    heads = [kv_head] if sel.num_heads == 2 else group
    for h in heads:
        assert tokens[0, h, -1, 48:64].any(), f"head {h} missed the planted keys"
    if case.config.get("window", 1) == 0 and sel.num_heads == 4:
        # With no window the other group has no reason to look there; at least it must not be forced to.
        assert tokens[0, :, -1].sum(-1).min() < 160


@pytest.mark.parametrize(
    "name, config, match",
    [
        ("nope", {}, "unknown method name"),
        ("moba", {"top_k": -1}, "top_k"),
        ("moba", {"block_size": 0}, "block_size"),
        ("moba", {"block_size": 48}, "block_size must be a power of two"),
        ("streaming", {"window": -5}, "window"),
        ("streaming", {"sink_tokens": 1.5}, "sink_tokens"),
        ("dense", {"query_block_size": 3}, "query_block_size"),
        ("moba", {"topk": 3}, "no option"),
        ("moba", {"share_kv_heads": "yes"}, "share_kv_heads"),
    ],
)
def test_bad_config_raises_value_error(name, config, match):
    with pytest.raises(ValueError, match=match):
        longattn.get_method(name, **config)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_chunked_selection_equals_one_shot(case, monkeypatch):
    import longattn.methods.base as base

    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, 150, 8, generator=g), torch.randn(1, 2, 150, 8, generator=g)
    method = longattn.get_method(case.name, **case.config)
    whole = select(method, q, k)
    monkeypatch.setattr(base, "_SELECT_CHUNK_ELEMENTS", 1)  # one query block per chunk
    chunked = select(method, q, k)
    nkb = -(-150 // method.block_size)
    assert torch.equal(whole.to_mask(nkb), chunked.to_mask(nkb))
    assert torch.equal(whole.counts, chunked.counts)


def _planted(seed: int = 0, hq: int = 4, hkv: int = 2, t: int = 160, d: int = 16):
    """Random queries/keys where block 3 holds keys aligned with the last query block's queries."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, t, d, generator=g) * 0.1
    k = torch.randn(1, hkv, t, d, generator=g) * 0.1
    direction = torch.randn(d, generator=g)
    q[:, :, -16:] += direction
    k[:, :, 48:64] += direction
    return q, k


def test_moba_retrieves_the_block_its_queries_match():
    q, k = _planted()
    method = longattn.get_method("moba", block_size=16, top_k=1, window=0, sink_tokens=0)
    sel = select(method, q, k)
    last = sel.indices[0, :, -1]  # every head's last query block: [H, S]
    assert all(3 in row.tolist() for row in last), last


def test_shared_kv_heads_takes_the_max_over_the_group():
    q, k = _planted()
    q[:, [0, 2, 3], -16:] *= -1
    # Only query head 1 (group of KV head 0) wants block 3 now; its group partner, head 0, shuns it.
    shared = select(longattn.get_method("moba", block_size=16, top_k=1, window=0, sink_tokens=0,
                                             share_kv_heads=True), q, k)
    assert 3 in shared.indices[0, 0, -1].tolist()


def test_sinks_are_kept_for_far_away_queries():
    q, k = _planted()
    sel = select(longattn.get_method("streaming", block_size=16, sink_tokens=20, window=16), q, k)
    last = sel.to_mask(10)[0, :, -1]  # [H, Nblk]
    assert last[:, :2].all() and not last[:, 2:8].any() and last[:, 9].all()


def test_padding_blocks_are_never_retrieved_and_sinks_follow_the_padding():
    q, k = _planted()
    key_mask = torch.ones(1, 160, dtype=torch.bool)
    key_mask[0, :32] = False  # two blocks of left padding
    ctx = SelectionContext(kv_len=160, q_offset=0, layer=0, num_kv_heads=2, key_mask=key_mask, keys=k)
    method = longattn.get_method("moba", block_size=16, top_k=4, window=0, sink_tokens=4)
    sel = method.select(q, BlockIndex(16, "mean").update(k, 0), ctx)
    mask = sel.to_mask(10)[0]  # [H, Qblk, Nblk]
    assert not mask[:, 2:, :2].any()  # query blocks after the padding never look into it
    assert mask[:, 3:, 2].all()  # the row's first real block is its sink


def test_scored_methods_pool_at_most_16_queries_by_default():
    assert longattn.get_method("moba", block_size=64).query_block_size_for(100) == 16
    assert longattn.get_method("moba", block_size=64, query_block_size=64).query_block_size_for(100) == 64
    assert longattn.get_method("streaming", block_size=64).query_block_size_for(100) == 64
    assert longattn.get_method("moba").query_block_size_for(1) == 1
