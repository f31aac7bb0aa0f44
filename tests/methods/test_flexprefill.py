"""FlexPrefill: pattern choice per head (query-aware vs vertical-slash) and gamma-covering budgets."""

from __future__ import annotations

import math

import pytest
import torch

import longattn
from longattn.core.index import BlockIndex
from longattn.methods import SelectionContext
from longattn.methods.flexprefill import FlexPrefill


def _ctx(q: torch.Tensor, k: torch.Tensor) -> SelectionContext:
    return SelectionContext(kv_len=k.shape[2], q_offset=k.shape[2] - q.shape[2], layer=0, num_kv_heads=k.shape[1],
                            keys=k)


def _select(method: FlexPrefill, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Block mask ``[B, H, Qblk, Nblk]`` of the method's selection."""
    sel = method.select(q, BlockIndex(method.block_size, "mean").update(k, 0), _ctx(q, k))
    return sel.to_mask(-(-k.shape[2] // method.block_size))


def _plan(method: FlexPrefill, q: torch.Tensor, k: torch.Tensor):
    return method.plan(q, BlockIndex(method.block_size, "mean").update(k, 0), _ctx(q, k))


def test_vertical_line_head_is_vertical_slash_and_keeps_the_line_everywhere():
    """KV head 0: every query attends key 40 (block 2). Its mean key barely shows it, so the estimate
    disagrees with the true attention and the head is vertical-slash; KV head 1 is diffuse and query-aware."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 160, 16, generator=g) * 0.1
    k = torch.randn(1, 2, 160, 16, generator=g) * 0.1
    u = torch.randn(16, generator=g)
    u = u / u.norm() * 4
    k[0, 0, 40] = u
    q[0, :2] += 3 * u
    method = FlexPrefill(block_size=16, sink_tokens=0, window=16, gamma=0.9, min_blocks=0)
    assert _plan(method, q, k).vertical_slash[0].tolist() == [True, True, False, False]
    mask = _select(method, q, k)[0]  # [H, Qblk, Nblk]
    assert mask[:2, 2:, 2].all()  # block 2 for every query block that can see it
    assert mask[:2, 5:].sum(-1).float().mean() < 6  # a line, not the whole past


def test_slash_head_keeps_the_diagonal_band_in_every_query_block():
    """Query i matches key i - 50 only: the last block's attention is one diagonal, which must turn into the
    key blocks that band crosses in *every* query block, not only near the last one."""
    g = torch.Generator().manual_seed(1)
    t, d, o = 160, 64, 50
    w = torch.randn(t, d, generator=g)
    k = w.view(1, 1, t, d).clone()
    q = torch.randn(1, 1, t, d, generator=g) * 0.1
    q[0, 0, o:] = 3 * w[: t - o]
    method = FlexPrefill(block_size=16, sink_tokens=0, window=0, gamma=0.9, min_blocks=0)
    assert _plan(method, q, k).vertical_slash.all()
    mask = _select(method, q, k)[0, 0]  # [Qblk, Nblk]
    for i in range(o, t):
        assert mask[i // 16, (i - o) // 16], f"query {i} lost key {i - o} on its diagonal"
    assert mask.sum() < 0.6 * torch.ones(10, 10).tril().sum()


@pytest.mark.parametrize("q_offset", [0, 20])
def test_diagonal_bands_match_a_brute_force_over_token_pairs(q_offset):
    """Key block n is kept for query block j iff some query i of j meets a key of n at a kept offset i - k >= 0:
    checked for each single offset, and for a random set of them."""
    tk, bs, qbs = 75, 8, 4
    method = FlexPrefill(block_size=bs, query_block_size=qbs)
    ctx = SelectionContext(kv_len=tk, q_offset=q_offset, layer=0, num_kv_heads=1)
    sets = [torch.arange(tk) == o for o in range(tk)]
    sets.append(torch.rand(tk, generator=torch.Generator().manual_seed(7)) < 0.1)
    kept = torch.stack(sets).view(1, -1, tk)  # one "head" per offset set
    diagonals = torch.nn.functional.pad(kept.long().cumsum(-1), (1, 0))
    got = method._diagonal_blocks(tk - q_offset, ctx, qbs, diagonals)[0]  # [sets, Qblk, Nblk]
    want = torch.zeros_like(got)
    for h in range(kept.shape[1]):
        for o in kept[0, h].nonzero().flatten().tolist():
            for i in range(max(q_offset, o), tk):
                want[h, (i - q_offset) // qbs, (i - o) // bs] = True
    assert torch.equal(got, want)


def test_diffuse_heads_are_query_aware_at_the_default_tau():
    """Near-uniform attention over a prompt whose last block is partial: the estimate must account for the
    partly visible diagonal block, or every head of a diffuse model looks vertical-slash."""
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 4, 200, 16, generator=g) * 0.01, torch.randn(1, 2, 200, 16, generator=g) * 0.01
    assert not _plan(FlexPrefill(), q, k).vertical_slash.any()


def _diffuse(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 160, 16, generator=g), torch.randn(1, 2, 160, 16, generator=g)


def test_query_aware_budget_grows_with_gamma():
    q, k = _diffuse()
    masks = [_select(FlexPrefill(block_size=16, sink_tokens=0, window=16, gamma=gm, tau=1.0), q, k)
             for gm in (0.2, 0.5, 0.8, 0.95)]
    for small, large in zip(masks, masks[1:]):
        assert bool((small <= large).all())  # nested: a larger gamma only adds blocks
    counts = [int(m.sum()) for m in masks]
    assert counts == sorted(counts) and counts[0] < counts[-1], counts


def test_selected_estimated_mass_reaches_gamma_and_no_block_is_spare():
    q, k = _diffuse(3)
    gamma, bs = 0.6, 16
    mask = _select(FlexPrefill(block_size=bs, sink_tokens=0, window=0, gamma=gamma, tau=1.0, min_blocks=0), q, k)
    # Independent estimate: mean query of each query block against each mean key, over the earlier blocks
    # (the query's own block is the static window).
    pooled_q = q.view(1, 4, 10, bs, 16).mean(3)
    pooled_k = k.view(1, 2, 10, bs, 16).mean(3).repeat_interleave(2, dim=1)
    scores = pooled_q @ pooled_k.transpose(-1, -2) / math.sqrt(16)  # [1, H, Qblk, Nblk]
    earlier = torch.ones(10, 10, dtype=torch.bool).tril(-1)
    probs = torch.softmax(scores.masked_fill(~earlier, float("-inf")), -1)
    for h in range(4):
        for j in range(1, 10):
            picked = mask[0, h, j] & earlier[j]
            mass = probs[0, h, j][picked]
            assert mass.sum() >= gamma - 1e-5
            assert mass.sum() - mass.min() < gamma  # the lightest picked block was needed
            assert mask[0, h, j, j] and not mask[0, h, j, j + 1 :].any()


def test_budgets_adapt_across_heads_of_one_input():
    """Same gamma, same input: a head whose queries all point at one block keeps fewer blocks than a diffuse one."""
    q, k = _diffuse(4)
    q, k = q * 0.1, k * 0.1
    direction = torch.randn(16, generator=torch.Generator().manual_seed(5))
    q[:, :2] += 2 * direction
    k[:, 0, 48:64] += 2 * direction
    counts = _select(FlexPrefill(block_size=16, sink_tokens=0, window=16, gamma=0.8, tau=1.0), q, k).sum((-1, -2))[0]
    assert counts[:2].max() < counts[2:].min(), counts


@pytest.mark.parametrize("tk", [1, 17, 150, 300])
@pytest.mark.parametrize("decode", [False, True])
def test_full_gamma_keeps_every_causal_block(tk, decode):
    g = torch.Generator().manual_seed(tk)
    q = torch.randn(1, 4, 1 if decode else tk, 8, generator=g) * 5  # peaked attention, tiny tail masses
    k = torch.randn(1, 2, tk, 8, generator=g) * 5
    method = FlexPrefill(block_size=16, sink_tokens=0, window=0, gamma=1.0, tau=0.0)
    mask = _select(method, q, k)
    qbs = method.query_block_size_for(q.shape[2])
    causal = method.causal_block_mask(q.shape[2], _ctx(q, k), qbs).expand_as(mask)
    assert torch.equal(mask, causal)


def test_decode_is_query_aware_and_needs_no_raw_keys():
    q, k = _diffuse(6)
    method = FlexPrefill(block_size=16, sink_tokens=0, window=16, gamma=0.5, tau=0.0)
    ctx = SelectionContext(kv_len=160, q_offset=159, layer=0, num_kv_heads=2)  # no keys
    summaries = BlockIndex(16, "mean").update(k, 0)
    plan = method.plan(q[:, :, -1:], summaries, ctx)
    assert not plan.vertical_slash.any()
    sel = method.select(q[:, :, -1:], summaries, ctx)
    assert sel.num_q_blocks == 1 and int(sel.counts.max()) < 10


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_padding_blocks_are_never_retrieved(tau):
    q, k = _diffuse(9)
    key_mask = torch.ones(1, 160, dtype=torch.bool)
    key_mask[0, :40] = False  # left padding: blocks 0 and 1 hold no real key, block 2 some
    ctx = SelectionContext(kv_len=160, q_offset=0, layer=0, num_kv_heads=2, key_mask=key_mask, keys=k)
    method = FlexPrefill(block_size=16, sink_tokens=4, window=16, gamma=0.9, tau=tau)
    sel = method.select(q, BlockIndex(16, "mean").update(k, 0), ctx)
    mask = sel.to_mask(10)[0]  # [H, Qblk, Nblk]
    assert not mask[:, 3:, :2].any() and mask[:, 3:, 2].all()  # block 2 is the row's sink
    assert mask[:, -1].sum(-1).min() > 3  # sink + window (2 blocks) + at least one retrieved


@pytest.mark.parametrize(
    "config, match",
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": "high"}, "gamma"),
        ({"gamma": True}, "gamma"),
        ({"tau": -0.1}, "tau"),
        ({"tau": 1.01}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"min_blocks": -1}, "min_blocks"),
        ({"min_blocks": 1.0}, "min_blocks"),
        ({"block_size": 12}, "block_size"),
    ],
)
def test_bad_config_raises_value_error(config, match):
    with pytest.raises(ValueError, match=match):
        longattn.get_method("flexprefill", **config)


def test_edge_configs_are_accepted():
    FlexPrefill(gamma=1.0, tau=0.0, min_blocks=0)
    FlexPrefill(gamma=1e-3, tau=1.0)
    assert FlexPrefill().query_block_size_for(4096) == 16 and FlexPrefill().query_block_size_for(1) == 1
