"""The quality options every scored method takes: ``top_p``, ``exact_last``, ``compensate``, ``min_layer_mass``
and ``hidden_sinks``."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.hf.session import Session
from longattn.methods import SelectionContext
from longattn.ops.block_topk.pick import top_p_blocks
from longattn.ops import block_sparse_attention
from longattn.ops.summary_attention import block_means
from tests.conftest import tiny_model
from tests.methods.helpers import select


@pytest.mark.parametrize("config, match", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": True}, "top_p"), ({"top_p": "0.9"}, "top_p"),
    ({"exact_last": 1}, "exact_last"), ({"compensate": "yes"}, "compensate"),
    ({"hidden_sinks": -1}, "hidden_sinks"), ({"hidden_sinks": 1.5}, "hidden_sinks"),
])
def test_bad_options_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        longattn.get_method("moba", **config)


def test_top_p_takes_the_fewest_blocks_that_reach_p():
    # One row: static block 0 holds ~e^0, eligible blocks 1..4 hold e^3, e^2, e^1, e^-5.
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0, -5.0]).view(1, 1, 1, 5)
    static = torch.tensor([True, False, False, False, False]).view(1, 1, 1, 5)
    eligible = ~static
    probs = torch.softmax(logits.flatten(), 0)
    for p, want in ((0.1, [1]), (float(probs[:2].sum()) + 1e-4, [1, 2]), (0.99, [1, 2, 3]), (1.0, [1, 2, 3, 4])):
        got = top_p_blocks(logits, static, eligible, p, cap=8)[0, 0, 0].nonzero().flatten().tolist()
        assert got == want, (p, got)
    assert top_p_blocks(logits, static, eligible, 0.99, cap=2)[0, 0, 0].nonzero().flatten().tolist() == [1, 2]
    # Where the static blocks already hold p, nothing more is needed.
    assert not top_p_blocks(torch.tensor([9.0, 0, 0, 0, 0]).view(1, 1, 1, 5), static, eligible, 0.9, 8).any()


def test_top_p_spends_less_than_top_k_on_a_peaked_row_and_more_on_a_flat_one():
    torch.manual_seed(0)
    d, tk = 16, 256
    k = torch.randn(1, 1, tk, d) * 0.1
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 30.0
    peaked = k.clone()
    peaked[:, :, 64:80, 0] = 2.0  # one block every query matches
    m = longattn.get_method("moba", block_size=16, window=16, sink_tokens=0, top_k=8, top_p=0.9)
    few = select(m, q, peaked).counts.item()
    many = select(m, q, k).counts.item()
    fixed = select(longattn.get_method("moba", block_size=16, window=16, sink_tokens=0, top_k=8), q, k).counts.item()
    assert few < many <= fixed
    assert 64 // 16 in select(m, q, peaked).indices.flatten().tolist()


def _hidden_key_case():
    """A block whose mean key is ~0 but which holds the one key the last queries match (mean scoring misses
    it), and a decoy block whose mean matches mildly."""
    torch.manual_seed(1)
    d, tk, tq = 16, 256, 32
    k = torch.randn(1, 1, tk, d) * 0.05
    direction = torch.zeros(d)
    direction[0] = 1.0
    k[0, 0, 70] = 8.0 * direction  # the needle, inside block 4
    k[0, 0, 64:70] -= 8.0 / 15 * direction
    k[0, 0, 71:80] -= 8.0 / 15 * direction
    k[0, 0, 160:176] += 0.5 * direction  # a decoy, block 10
    q = torch.randn(1, 1, tq, d) * 0.05
    q[0, 0, -16:] += 2.0 * direction
    return q, k


def test_exact_last_finds_the_block_mean_scoring_misses_and_changes_nothing_else():
    q, k = _hidden_key_case()
    base = dict(block_size=16, window=16, sink_tokens=0, top_k=1, query_block_size=16)
    plain = select(longattn.get_method("moba", **base), q, k)
    exact = select(longattn.get_method("moba", **base, exact_last=True), q, k)
    assert 4 not in plain.indices[0, 0, -1].tolist() and 10 in plain.indices[0, 0, -1].tolist()
    assert 4 in exact.indices[0, 0, -1].tolist()
    torch.testing.assert_close(plain.indices[:, :, :-1], exact.indices[:, :, :-1, : plain.indices.shape[-1]])
    # Decode selects by the rule: one query is a step of its own.
    one = select(longattn.get_method("moba", **base, exact_last=True), q[:, :, -1:], k)
    assert one.indices.tolist() == select(longattn.get_method("moba", **base), q[:, :, -1:], k).indices.tolist()


def test_compensation_brings_a_small_budget_closer_to_dense():
    torch.manual_seed(2)
    b, h, tk, d = 1, 2, 512, 32
    # Keys with block structure (a shared direction per block), so blocks differ and their means carry mass.
    k = torch.randn(b, h, tk // 16, 1, d).expand(-1, -1, -1, 16, -1).reshape(b, h, tk, d) + 0.3 * torch.randn(b, h, tk, d)
    v = torch.randn(b, h, tk, d)
    q = torch.randn(b, h, 64, d)
    cfg = dict(block_size=16, window=16, sink_tokens=16, top_k=2)
    errs = {}
    for compensate in (False, True):
        m = longattn.get_method("moba", **cfg, compensate=compensate)
        sel = select(m, q, k)
        ctx = SelectionContext(kv_len=tk, q_offset=tk - 64, layer=0, num_kv_heads=h, keys=k)
        out, lse = block_sparse_attention(q, k, v, sel, d ** -0.5, causal=True)
        if m.adjusts_output:
            out = m.adjust_output(out, lse, q, k, v, sel, ctx, d ** -0.5)
        dense = longattn.ops.dense_attention(q, k, v, d ** -0.5)
        errs[compensate] = float((out - dense).norm() / dense.norm())
    assert errs[True] < 0.8 * errs[False], errs


@pytest.mark.parametrize("name", ["moba", "quest"])  # mean summaries serve as mean keys; min/max do not
def test_the_session_keeps_block_means_like_recomputing_them(name):
    m = longattn.get_method(name, block_size=16, top_k=1, compensate=True)
    session = Session(m)
    torch.manual_seed(3)
    k, v = torch.randn(1, 2, 300, 8), torch.randn(1, 2, 300, 8)
    for t, new in ((200, 200), (201, 1), (208, 7), (300, 92)):
        summaries = session.index.update(k[:, :, :t], 0, new_tokens=new)
        km, vm, counts = session._block_means(k[:, :, :t], v[:, :, :t], None, 0, new, summaries)
        want_k, want_counts = block_means(k[:, :, :t], 16)
        want_v, _ = block_means(v[:, :, :t], 16)
        torch.testing.assert_close(km, want_k)
        torch.testing.assert_close(vm, want_v)
        assert counts.tolist() == want_counts.tolist()


def test_compensation_cannot_move_positions():
    model = tiny_model("llama")
    m = longattn.get_method("moba", block_size=16, top_k=1, compensate=True, positions="infllm")
    with pytest.raises(ValueError, match="positions"):
        with longattn.apply(model, m):
            pass


def test_compensated_decode_through_a_model_differs_from_plain_and_stays_finite():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    outs = {}
    for compensate in (False, True):
        m = longattn.get_method("moba", block_size=16, top_k=1, window=16, compensate=compensate)
        with longattn.apply(model, m), torch.no_grad():
            out = model(ids, use_cache=True)
            step = model(ids[:, -1:], past_key_values=out.past_key_values)
        outs[compensate] = (out.logits, step.logits)
    assert all(torch.isfinite(x).all() for x in outs[True])
    assert not torch.allclose(outs[True][0], outs[False][0]) and not torch.allclose(outs[True][1], outs[False][1])


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "0.9"])
def test_min_layer_mass_is_checked(bad):
    with pytest.raises(ValueError, match="min_layer_mass"):
        longattn.get_method("moba", min_layer_mass=bad)


def test_a_layer_whose_budget_cannot_hold_the_mass_runs_dense_in_prefill_and_decode():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(1))

    def run(method):
        with longattn.apply(model, method) if method else torch.no_grad(), torch.no_grad():
            out = model(ids, use_cache=True)
            rows = [out.logits[0, -1]]
            for i in range(3):
                out = model(tokens[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True)
                rows.append(out.logits[0, -1])
        return torch.stack(rows)

    cfg = dict(block_size=16, top_k=1, window=16)
    dense, plain = run(None), run(longattn.get_method("moba", **cfg))
    always = run(longattn.get_method("moba", **cfg, min_layer_mass=1.0))  # no 10-block budget holds all of it
    never = run(longattn.get_method("moba", **cfg, min_layer_mass=0.0))
    torch.testing.assert_close(always, dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(never, plain)
    assert (plain - dense).abs().max() > 1e-3


def test_hidden_sinks_keep_the_block_far_attention_goes_to_everywhere_it_may_be_read():
    q, k = _hidden_key_case()
    base = dict(block_size=16, window=16, sink_tokens=0, top_k=1, query_block_size=16)
    plain = select(longattn.get_method("moba", **base), q, k)
    aware = select(longattn.get_method("moba", **base, hidden_sinks=1), q, k)
    assert all(4 not in row for row in plain.indices[0, 0].tolist())
    for row_plain, row_aware in zip(plain.indices[0, 0].tolist(), aware.indices[0, 0].tolist()):
        assert set(row_plain) - {-1} <= set(row_aware)  # the rule's picks stay
    # The last query block (whose rows read the needle, like the sampled rows inside it) keeps block 4; the
    # first one was sampled only by rows that do not look at it, and a block never learns from later queries.
    assert 4 in aware.indices[0, 0, -1].tolist()


def test_hidden_sinks_found_in_the_prompt_are_kept_in_decode():
    q, k = _hidden_key_case()
    m = longattn.get_method("blockmax", block_size=16, window=16, sink_tokens=0, top_k=1, hidden_sinks=1)
    memory: dict = {}
    ctx = SelectionContext(kv_len=256, q_offset=224, layer=0, num_kv_heads=1, keys=k, memory=memory)
    m.select(q, None, ctx)
    k2 = torch.cat([k, torch.randn(1, 1, 1, 16) * 0.05], dim=2)  # decode opens block 16
    q1 = torch.zeros(1, 1, 1, 16)
    q1[..., 2] = 2.0  # a query orthogonal to the needle: nothing singles out block 4
    ctx = SelectionContext(kv_len=257, q_offset=256, layer=0, num_kv_heads=1, keys=k2, memory=memory)
    assert 4 in m.select(q1, None, ctx).indices[0, 0, 0].tolist()
    fresh = SelectionContext(kv_len=257, q_offset=256, layer=0, num_kv_heads=1, keys=k2, memory={})
    assert 4 not in longattn.get_method("blockmax", block_size=16, window=16, sink_tokens=0, top_k=1).select(
        q1, None, fresh).indices[0, 0, 0].tolist()
