"""HiP: the hierarchy finds a lone planted block, covers every eligible block, equals exhaustive top-k where
span means rank like their blocks, and is a different rule from MoBA's flat top-k."""

from __future__ import annotations

import pytest
import torch

import longattn
import longattn.methods.hip as hip
from longattn.core.index import BlockIndex
from longattn.methods import SelectionContext
from longattn.methods.hip import HiP, initial_spans


def _select(method, q, k, key_mask=None):
    """``method.select`` for queries ``q [B, Hq, Tq, D]`` that are the newest of keys ``k [B, Hkv, Tk, D]``."""
    ctx = SelectionContext(kv_len=k.shape[2], q_offset=k.shape[2] - q.shape[2], layer=0, num_kv_heads=k.shape[1],
                           key_mask=key_mask, keys=k)
    return method.select(q, BlockIndex(method.block_size, "mean").update(k, 0), ctx)


def _planted(blocks: int, at: int, tq: int, seed: int = 0, d: int = 32):
    """Noise keys of ``blocks`` 16-key blocks; block ``at`` and the queries share one direction."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, blocks * 16, d, generator=g) * 0.02
    q = torch.randn(1, 4, tq, d, generator=g) * 0.02
    direction = torch.randn(d, generator=g)
    k[:, :, at * 16 : (at + 1) * 16] += direction
    q += direction
    return q, k


@pytest.mark.parametrize("tq", [1, 16], ids=["decode", "prefill"])
@pytest.mark.parametrize("at", [1, 2, 301, 577], ids=lambda a: f"block{a}")
def test_finds_one_planted_block_among_hundreds(at, tq):
    """600 blocks, 4 spans of ~145 blocks at the first level: only the halving can single the block out."""
    method = HiP(block_size=16, sink_tokens=16, window=128, top_k=4)
    q, k = _planted(600, at, tq)
    sel = _select(method, q, k)
    mask = sel.to_mask(600)[0, :, -1]  # every head's last query block: [H, Nblk]
    assert mask[:, at].all(), f"block {at} missed"
    # One sink block, 9 window blocks (8 in decode), 4 retrieved: the budget, not a fallback to dense.
    assert int(mask.sum(-1).max()) <= 1 + 9 + 4


def test_scores_logarithmically_many_spans():
    """Each level scores only the midpoints of k spans: O(k log T) prefix points per query block, not Nblk."""
    q, k = _planted(600, 301, 1)
    seen = []
    original = hip._products

    def counting(queries, prefix, points):
        seen.append(points.shape[-1])
        return original(queries, prefix, points)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hip, "_products", counting)
        _select(HiP(block_size=16, sink_tokens=16, window=128, top_k=4), q, k)
    # The 4 initial spans hold 147 or 148 of the 590 eligible blocks; halving them takes 7 or 8 levels (the
    # floor side of a split shrinks faster), each scoring 4 midpoints after the 2 x 4 initial ends.
    assert set(seen) == {4} and 2 + 7 <= len(seen) <= 2 + 8


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 40])
def test_first_level_spans_cover_every_eligible_block(k):
    g = torch.Generator().manual_seed(k)
    eligible = torch.rand(64, 37, generator=g) < 0.7  # rows with holes, ranges of every length, empty rows
    eligible[:8] = False
    for n in range(8):
        eligible[n, 5 : 5 + n] = True
    start, end = initial_spans(eligible, k)
    for row in range(eligible.shape[0]):
        ids = eligible[row].nonzero().flatten().tolist()
        used = end[row] > start[row]
        s, e = start[row][used].tolist(), end[row][used].tolist()
        if not ids:
            assert not s
            continue
        n = ids[-1] + 1 - ids[0]
        assert len(s) == min(k, n)
        assert s[0] == ids[0] and e[-1] == ids[-1] + 1  # the spans tile [first, last + 1) ...
        assert s[1:] == e[:-1]  # ... without gaps or overlaps ...
        widths = [b - a for a, b in zip(s, e)]
        assert max(widths) - min(widths) <= 1  # ... in nearly equal parts


@pytest.mark.parametrize("at", range(7, 46))
def test_every_eligible_block_can_be_retrieved(at):
    """Block 7 follows the sinks (blocks 0..6) and block 45 precedes the window: each can be the one found."""
    method = HiP(block_size=16, sink_tokens=100, window=48, top_k=3)
    q, k = _planted(50, at, 1, seed=at)
    assert _select(method, q, k).to_mask(50)[0, :, -1, at].all()


def _monotone(blocks: int, tq: int, rising: bool, seed: int = 0, d: int = 16):
    """Every block's mean key is ``c_n * u`` with ``c_n`` monotone in ``n``; every query has ``q · u > 0``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    c = torch.rand(2, blocks, generator=g).sort(dim=-1, descending=not rising).values + 0.1  # [Hkv, Nblk]
    wiggle = torch.randn(2, blocks, 8, d, generator=g)
    wiggle = torch.cat((wiggle, -wiggle), dim=2)  # zero mean within each 16-key block
    k = (c[..., None, None] * u + wiggle).view(1, 2, blocks * 16, d)
    noise = torch.randn(1, 4, tq, d, generator=g)
    q = noise - (noise @ u)[..., None] * u + (torch.rand(1, 4, tq, 1, generator=g) + 0.5) * u
    return q, k


@pytest.mark.parametrize("rising", [True, False], ids=["rising", "falling"])
@pytest.mark.parametrize("top_k", [1, 3, 5, 16])
@pytest.mark.parametrize("tq", [1, 160], ids=["decode", "prefill"])
def test_equals_exhaustive_top_k_when_span_means_rank_like_blocks(top_k, rising, tq):
    """With block scores monotone in position, a span's mean ranks it like its blocks, so halving loses
    nothing: HiP picks exactly MoBA's exhaustive top-k of the same block-mean scores."""
    q, k = _monotone(90, tq, rising)
    config = dict(block_size=16, sink_tokens=16, window=64, top_k=top_k)
    ours = _select(HiP(**config), q, k).to_mask(90)
    exhaustive = _select(longattn.get_method("moba", **config), q, k).to_mask(90)
    assert torch.equal(ours, exhaustive)


def test_differs_from_flat_top_k_on_random_data():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 512, 16, generator=g), torch.randn(1, 2, 512, 16, generator=g)
    config = dict(block_size=16, sink_tokens=16, window=32, top_k=4)
    ours, flat = _select(HiP(**config), q, k), _select(longattn.get_method("moba", **config), q, k)
    assert torch.equal(ours.counts, flat.counts)  # the same budget ...
    assert not torch.equal(ours.to_mask(32), flat.to_mask(32))  # ... spent by a different rule


def test_shared_kv_heads_searches_once_per_group_for_any_head_that_needs_a_block():
    q, k = _planted(200, 50, 1)
    q[:, [0, 2, 3]] *= -1  # only query head 1 (KV head 0's group) still wants block 50
    sel = _select(HiP(block_size=16, sink_tokens=16, window=64, top_k=2, share_kv_heads=True), q, k)
    assert sel.num_heads == 2 and sel.to_mask(200)[0, 0, -1, 50]


def test_padding_blocks_are_never_retrieved():
    q, k = _planted(40, 20, 16)
    key_mask = torch.ones(1, 640, dtype=torch.bool)
    key_mask[0, :72] = False  # 4.5 blocks of left padding: block 4 holds the first real keys
    mask = _select(HiP(block_size=16, sink_tokens=16, window=32, top_k=8), q, k, key_mask).to_mask(40)[0, :, -1]
    assert not mask[:, :4].any() and mask[:, 4:6].all() and mask[:, 20].all()


def test_full_budget_keeps_every_eligible_block():
    q, k = _planted(30, 9, 16)
    mask = _select(HiP(block_size=16, sink_tokens=16, window=32, top_k=27), q, k).to_mask(30)
    assert mask[0, :, -1].all()


@pytest.mark.parametrize(
    "config, match",
    [
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"block_size": 24}, "block_size must be a power of two"),
        ({"window": -16}, "window"),
        ({"share_kv_heads": 1}, "share_kv_heads"),
        ({"query_block_size": 12}, "query_block_size"),
    ],
)
def test_bad_config_raises_value_error(config, match):
    with pytest.raises(ValueError, match=match):
        longattn.get_method("hip", **config)


def test_defaults_suit_the_default_model():
    method = longattn.get_method("hip")
    assert (method.block_size, method.sink_tokens, method.window, method.top_k) == (16, 16, 128, 32)
    assert method.summary == "mean" and "2406.09827" in method.paper
