"""DHSA: content-defined chunk boundaries, length normalisation, truncation at the horizon, max_chunk splits."""

from __future__ import annotations

import math

import pytest
import torch

import longattn
from longattn.methods import SelectionContext
from longattn.methods.dhsa import DHSA


def _ctx(k: torch.Tensor, tq: int) -> SelectionContext:
    return SelectionContext(kv_len=k.shape[2], q_offset=k.shape[2] - tq, layer=0, num_kv_heads=k.shape[1], keys=k)


def _segments(lengths: list[int], d: int = 16, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    """Keys ``[1, 1, sum(lengths), d]``: segment ``i`` is basis direction ``i`` plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.eye(d)[i].expand(n, d) + noise * torch.randn(n, d, generator=g) for i, n in enumerate(lengths)]
    return torch.cat(parts).view(1, 1, -1, d)


def _naive_chunks(method: DHSA, keys: torch.Tensor) -> list[tuple[int, int]]:
    """One head's chunks as ``(first, past-the-end)`` units, by a plain loop over units."""
    u, n = method.unit, keys.shape[2] // method.unit
    means = [keys[0, 0, i * u : (i + 1) * u].double().mean(0) for i in range(n)]
    starts = [0]
    for i in range(1, n):
        similar = torch.nn.functional.cosine_similarity(means[i - 1], means[i], dim=0) >= method.threshold
        if not similar or (i - starts[-1]) * u >= method.max_chunk:
            starts.append(i)
    return list(zip(starts, starts[1:] + [n]))


def _naive_block_scores(method: DHSA, q: torch.Tensor, k: torch.Tensor, qbs: int) -> torch.Tensor:
    """Loops over query blocks and units: ``q [1, Hq, Tq, D]``, ``k [1, 1, Tk, D]`` -> ``[Hq, Qblk, Nblk]``.

    A unit scores the better of its chunk (cut at the horizon) and itself alone, each as q . sum / sqrt(len).
    """
    tq, tk, bs, u = q.shape[2], k.shape[2], method.block_size, method.unit
    nqb, nkb = -(-tq // qbs), -(-tk // bs)
    of_unit = {i: c for c in _naive_chunks(method, k) for i in range(*c)}
    out = torch.full((q.shape[1], nqb, nkb), float("-inf"), dtype=torch.float64)
    for j in range(nqb):
        first = tk - tq + j * qbs
        horizon = min(max(first - method.window, 0) // bs, first // bs) * bs // u
        rows = q[0, :, j * qbs : (j + 1) * qbs].double()
        for i in range(horizon):
            s, e = of_unit[i][0], min(of_unit[i][1], horizon)
            chunk = k[0, 0, s * u : e * u].double()
            alone = k[0, 0, i * u : (i + 1) * u].double()
            score = torch.maximum(rows @ chunk.sum(0) / math.sqrt(len(chunk)), rows @ alone.sum(0) / math.sqrt(u))
            score = score.amax(-1)  # [Hq]
            out[:, j, i * u // bs] = torch.maximum(out[:, j, i * u // bs], score)
    return out


def test_boundaries_fall_where_the_key_content_changes_and_nowhere_else():
    method = DHSA(unit=8, threshold=0.5, max_chunk=1024)
    keys = _segments([40, 56, 64])  # changes at tokens 40 and 96 = units 5 and 12
    start, end = method.chunks(keys)
    assert sorted(set(start[0, 0].tolist())) == [0, 5, 12]
    assert start[0, 0].tolist() == [0] * 5 + [5] * 7 + [12] * 8
    assert end[0, 0].tolist() == [5] * 5 + [12] * 7 + [20] * 8
    assert _naive_chunks(method, keys) == [(0, 5), (5, 12), (12, 20)]


@pytest.mark.parametrize("threshold, max_chunk", [(0.5, 128), (0.0, 64), (0.9, 32), (-1.0, 16)])
def test_chunks_match_the_loop_reference_and_never_depend_on_later_keys(threshold, max_chunk):
    g = torch.Generator().manual_seed(1)
    # Slowly drifting keys give runs of similar units of many lengths.
    keys = (torch.randn(1, 1, 400, 8, generator=g) * 0.3 + torch.randn(1, 1, 400, 8, generator=g).cumsum(2) * 0.2)
    method = DHSA(unit=8, threshold=threshold, max_chunk=max_chunk)
    start, end = method.chunks(keys)
    assert list(zip(start[0, 0].unique().tolist(), end[0, 0].unique().tolist())) == _naive_chunks(method, keys)
    prefix_start, _ = method.chunks(keys[:, :, :200])
    assert torch.equal(prefix_start, start[..., :25])


def test_a_chunk_longer_than_max_chunk_is_split():
    method = DHSA(unit=8, max_chunk=64)
    keys = _segments([40, 216])  # one content boundary at token 40, then 216 similar tokens
    start, end = method.chunks(keys)
    chunks = sorted(set(zip(start[0, 0].tolist(), end[0, 0].tolist())))
    # Units: [0, 5) by content, then 27 similar units cut every 64 / 8 = 8 units from the run's start.
    assert chunks == [(0, 5), (5, 13), (13, 21), (21, 29), (29, 32)]
    assert DHSA(unit=8, max_chunk=1024).chunks(keys)[0][0, 0].unique().tolist() == [0, 5]


def test_length_normalisation_favours_long_chunks_by_sqrt_len():
    d = 16
    v = torch.eye(d)[0]
    # Units of 8: [sep x2][v x8 = 64 identical tokens][sep x2][v x1 = 8 tokens][sep ...] up to 256 tokens.
    keys = torch.eye(d)[1].repeat(256, 1)
    keys[16:80] = v
    keys[96:104] = v
    keys[104:112] = torch.eye(d)[2]
    keys = keys.view(1, 1, 256, d)
    q = torch.zeros(1, 2, 16, d)
    q[:, :, :] = v
    method = DHSA(block_size=16, unit=8, window=0, sink_tokens=0, threshold=0.5, max_chunk=128)
    scores = method.block_scores(q, None, _ctx(keys, 16), 16)[0, 0, -1]  # [Nblk]
    long, short = scores[1:5], scores[6]
    assert torch.allclose(long, torch.full_like(long, math.sqrt(64)))  # 64 / sqrt(64): mean x sqrt(len)
    assert short.item() == pytest.approx(math.sqrt(8))
    assert (long / short).min().item() == pytest.approx(math.sqrt(8))  # sqrt(len) ratio, neither 8 nor 1
    assert scores[0].item() == 0 and scores[5].item() == 0  # the separators do not match the query


def test_a_matching_unit_inside_a_long_chunk_is_still_found():
    g = torch.Generator().manual_seed(4)
    d = 16
    k = torch.randn(1, 1, 160, d, generator=g) * 0.1
    v = torch.randn(d, generator=g)
    k[:, :, 48:56] += v  # one unit of block 3
    q = torch.randn(1, 2, 160, d, generator=g) * 0.1
    q[:, :, -16:] += v
    # threshold -1 never cuts on content: keys 0..127 form one chunk whose score ties across blocks 0..7.
    method = DHSA(block_size=16, unit=8, window=0, sink_tokens=0, top_k=1, threshold=-1.0, max_chunk=128)
    scores = method.block_scores(q, None, _ctx(k, 160), 16)[0, :, -1]  # [Hq, Nblk]
    others = scores[:, [0, 1, 2, 4, 5, 6, 7]]
    assert torch.equal(others, others[:, :1].expand_as(others))  # the chunk's score, upsampled
    assert (scores[:, 3] > others[:, 0]).all()  # the unit's own score breaks the tie
    sel = method.select(q, None, _ctx(k, 160))
    assert sel.indices[0, :, -1, 0].tolist() == [3, 3]


def test_padding_blocks_are_never_retrieved():
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 2, 160, 8, generator=g), torch.randn(1, 1, 160, 8, generator=g)
    key_mask = torch.ones(1, 160, dtype=torch.bool)
    key_mask[0, :32] = False
    ctx = SelectionContext(kv_len=160, q_offset=0, layer=0, num_kv_heads=1, key_mask=key_mask, keys=k)
    mask = DHSA(block_size=16, top_k=4, window=0, sink_tokens=0).select(q, None, ctx).to_mask(10)[0]
    assert not mask[:, 2:, :2].any()  # nothing before the first real key
    assert (mask[:, 6:].sum(-1) == 5).all()  # its own block + top_k = 4 of the >= 4 real blocks before it


def test_block_scores_match_the_loop_reference():
    g = torch.Generator().manual_seed(3)
    # Three content segments plus noise, so chunks are neither all units nor one chunk.
    k = _segments([72, 88, 40], d=8, noise=0.4, seed=3)
    q = torch.randn(1, 3, 200, 8, generator=g)
    method = DHSA(block_size=16, unit=4, window=32, sink_tokens=16, threshold=0.3, max_chunk=48)
    got = method.block_scores(q, None, _ctx(k, 200), 16)[0]
    want = _naive_block_scores(method, q, k, 16)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-4, atol=1e-4)


def test_keys_after_the_horizon_do_not_change_the_scores():
    g = torch.Generator().manual_seed(5)
    d = 8
    k = torch.randn(1, 1, 256, d, generator=g)
    k[:, :, 64:160] = torch.randn(d, generator=g) + 0.05 * torch.randn(96, d, generator=g)  # one chunk over 96
    q = torch.randn(1, 2, 256, d, generator=g)
    method = DHSA(block_size=16, unit=8, window=32, sink_tokens=0, max_chunk=256)
    start, end = method.chunks(k)
    assert start[0, 0, 96 // 8] < 96 // 8 < end[0, 0, 96 // 8] - 1  # the setup really has a chunk crossing 96
    before = method.block_scores(q, None, _ctx(k, 256), 16)[0]
    k2 = k.clone()
    k2[:, :, 96:] = torch.randn(1, 1, 160, d, generator=g)
    after = method.block_scores(q, None, _ctx(k2, 256), 16)[0]
    # Query blocks up to 8 start by 128, so their window starts (horizons) lie at or before 128 - 32 = 96.
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.equal(before[:, 9:], after[:, 9:])  # later blocks do see the change


def test_decode_scores_only_blocks_before_the_window():
    g = torch.Generator().manual_seed(6)
    k, q = torch.randn(1, 1, 100, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
    method = DHSA(block_size=16, unit=8, window=40, sink_tokens=0)
    scores = method.block_scores(q, None, _ctx(k, 1), 1)[0, :, 0]  # query at 99: window starts at block 3
    assert torch.isfinite(scores[:, :3]).all() and torch.isinf(scores[:, 3:]).all()
    torch.testing.assert_close(scores.double(), _naive_block_scores(method, q, k, 1)[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"unit": 3}, "unit"),
        ({"unit": 0}, "unit"),
        ({"unit": 32, "block_size": 16}, "unit must divide block_size"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"max_chunk": 0}, "max_chunk"),
        ({"max_chunk": 12, "unit": 8}, "max_chunk must be a positive multiple of unit"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_bad_config_names_the_field(config, match):
    with pytest.raises(ValueError, match=match):
        longattn.get_method("dhsa", **config)


def test_missing_raw_keys_is_a_clear_error():
    method = DHSA()
    ctx = SelectionContext(kv_len=64, q_offset=0, layer=0, num_kv_heads=1)
    with pytest.raises(ValueError, match="SelectionContext.keys"):
        method.select(torch.randn(1, 2, 64, 8), None, ctx)
