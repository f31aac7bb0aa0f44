"""act: finds planted hidden sinks, applies ACT's reweighting exactly, and leaves everything else alone."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.core.profile import HeadProfile, model_identity
from longattn.methods import SelectionContext
from longattn.ops import block_sparse_attention
from tests.conftest import tiny_model
from tests.methods.helpers import select

SINK = 137


def _planted(t: int = 300, hq: int = 2, seed: int = 0):
    """q, k, v where every query of head 0 likes key SINK (a hidden sink); head 1 is plain random."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, hq, t, 8, generator=g) * 0.3, torch.randn(1, 1, t, 8, generator=g) * 0.3,
               torch.randn(1, 1, t, 8, generator=g))
    k[0, 0, SINK] = 0.0
    k[0, 0, SINK, 0] = 2.5
    q[0, 0, :, 0] = 2.5
    return q, k, v


def _reference(q, k, v, scale, factor, threshold, keep_initial, min_distance, probes):
    """Dense loops: ratio of each key over the probe rows that see it from afar, the strongest keys above
    ``threshold`` are sinks, then ACT's reweighting of every row: ``[B, Hq, T, D]``."""
    _, hq, t, _ = q.shape
    out = torch.zeros_like(q)
    for h in range(hq):
        scores = (q[0, h] @ k[0, 0].T) * scale
        probs = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        ratio = torch.zeros(t)
        for j in range(keep_initial, t):
            far = [i for i in probes if i - min_distance > j]
            if far:
                ratio[j] = sum(float(probs[i, j]) * (i + 1) for i in far) / len(far)
        top = ratio.topk(8)
        sinks = [int(j) for r, j in zip(top.values, top.indices) if r >= threshold]
        for i in range(t):
            p = probs[i].clone()
            s = [j for j in sinks if j <= i]
            mass = float(p[s].sum()) if s else 0.0
            rest = torch.ones(t, dtype=torch.bool)
            rest[s] = False
            p[rest] *= (1 - factor * mass) / (1 - mass)
            p[s] *= factor
            out[0, h, i] = p @ v[0, 0]
    return out


def _run(method, q, k, v, scale=0.5):
    sel = select(method, q, k)
    out, lse = block_sparse_attention(q, k, v, sel, scale)
    ctx = SelectionContext(kv_len=k.shape[2], q_offset=0, layer=0, num_kv_heads=k.shape[1], keys=k)
    return out, method.adjust_output(out, lse, q, k, v, sel, ctx, scale)


def test_finds_the_planted_sink_and_matches_the_dense_reference():
    q, k, v = _planted()
    method = longattn.get_method("act", base="dense", probe_queries=16)
    sinks = method.find_sinks(q, k, SelectionContext(kv_len=300, q_offset=0, layer=0, num_kv_heads=1), 0.5)
    assert SINK in sinks[0, 0].tolist()
    plain, ours = _run(method, q, k, v)
    rows = torch.arange(1, 17) * 300 // 16 - 1
    expected = _reference(q, k, v, 0.5, 0.4, 5.0, 4, 64, rows.tolist())
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert (ours[0, 0, SINK + 1 :] - plain[0, 0, SINK + 1 :]).abs().max() > 1e-2  # head 0 really changed


def test_factor_one_and_no_sinks_leave_the_output_unchanged():
    q, k, v = _planted()
    plain, ours = _run(longattn.get_method("act", factor=1.0), q, k, v)
    torch.testing.assert_close(ours, plain)
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(1, 1, 300, 8, generator=g) * 0.01  # near-uniform attention: no sink anywhere
    plain, ours = _run(longattn.get_method("act"), flat, flat, v[:, :, :300])
    torch.testing.assert_close(ours, plain)


def test_only_attended_sinks_are_calibrated():
    q, k, v = _planted()
    # Streaming attends the sink only while it is inside a row's window; far rows must stay as they were.
    method = longattn.get_method("act", base={"name": "streaming", "block_size": 16, "window": 16})
    plain, ours = _run(method, q, k, v)
    torch.testing.assert_close(ours[0, 0, SINK + 48 :], plain[0, 0, SINK + 48 :])
    assert (ours[0, 0, SINK + 1 : SINK + 16] - plain[0, 0, SINK + 1 : SINK + 16]).abs().max() > 1e-2


def test_profile_limits_calibration_to_sink_heads():
    model = tiny_model("llama")
    ident = model_identity(model)
    zeros = [[0.0] * 4 for _ in range(2)]
    mass = [[0.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    profile = HeadProfile(model=ident, settings={}, retrieval=zeros, streaming=zeros, hidden_sink_mass=mass,
                          initial_sink_mass=zeros)
    method = longattn.get_method("act", profile=profile)
    assert method.calibrated_heads(0, 4, torch.device("cpu")).tolist() == [True, False, False, False]
    q, k, v = _planted(hq=4)
    q[0, 1] = q[0, 0]  # head 1 sees the sink as strongly, but the profile says it is not calibrated
    plain, ours = _run(method, q, k, v)
    torch.testing.assert_close(ours[:, 1:], plain[:, 1:])
    assert (ours[:, 0] - plain[:, 0]).abs().max() > 1e-2


def test_selection_is_the_base_methods():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 200, 8, generator=g), torch.randn(1, 2, 200, 8, generator=g)
    base = longattn.get_method("moba", block_size=16, top_k=2, window=16)
    act = longattn.get_method("act", base=base)
    assert torch.equal(select(act, q, k).indices, select(base, q, k).indices)
    assert act.block_size == 16 and act.window == 16
    by_spec = longattn.get_method("act", base={"name": "moba", "block_size": 16, "top_k": 2, "window": 16})
    assert by_spec.base == base


def test_dense_heads_of_the_base_run_through_the_operator():
    # The calibration reads the lse of every head, which SDPA-computed dense heads do not have.
    q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8)
    ctx = SelectionContext(kv_len=64, q_offset=0, layer=0, num_kv_heads=2, keys=k)
    assert longattn.get_method("dense").select(q, None, ctx).all_dense
    assert longattn.get_method("act").select(q, None, ctx).dense_heads is None


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"base": "act"}, "other than act"),
        ({"base": "nope"}, "unknown method"),
        ({"base": 3}, "base must be a Method"),
        ({"base": {"top_k": 2}}, "base must be a Method"),
        ({"factor": 1.5}, r"factor must lie in \[0, 1\]"),
        ({"threshold": 0.5}, "threshold must be"),
        ({"probe_queries": 0}, "probe_queries"),
        ({"block_size": 32}, "conflicts with base"),
        ({"min_sink_mass": 2.0}, "min_sink_mass"),
    ],
)
def test_bad_config_raises(config, match):
    with pytest.raises(ValueError, match=match):
        longattn.get_method("act", **config)
