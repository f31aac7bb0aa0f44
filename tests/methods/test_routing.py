"""Routing: planted clusters are retrieved, the clustering is causal, the config is checked, seeds matter."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.methods import SelectionContext
from longattn.methods.routing import Routing


def _select(method: Routing, q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None):
    ctx = SelectionContext(kv_len=k.shape[2], q_offset=k.shape[2] - q.shape[2], layer=0, num_kv_heads=k.shape[1],
                           key_mask=key_mask, keys=k)
    return method.select(q, None, ctx)


@pytest.mark.parametrize("decode", [False, True])
def test_retrieves_the_planted_cluster_in_a_later_epoch(decode):
    """Keys 304..319 (block 19, epoch 2 of 128-token epochs) share a direction with the last queries."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 512, 16, generator=g)
    k = torch.randn(1, 2, 512, 16, generator=g)
    direction = torch.randn(16, generator=g)
    k[:, :, 304:320] = direction + 0.1 * torch.randn(1, 2, 16, 16, generator=g)
    q[:, :, -16:] = direction + 0.1 * torch.randn(1, 4, 16, 16, generator=g)
    if decode:
        q = q[:, :, -1:]
    method = longattn.get_method("routing", block_size=16, top_k=1, window=0, sink_tokens=0, clusters=8,
                                 route_top=1, epoch_tokens=128)
    sel = _select(method, q, k)
    assert (sel.indices[0, :, -1] == 19).any(-1).all(), sel.indices[0, :, -1]
    # The block wins on its count (all 16 keys in the query's cluster), not only on the tie-breaker.
    ctx = SelectionContext(kv_len=512, q_offset=512 - q.shape[2], layer=0, num_kv_heads=2, keys=k)
    scores = method.block_scores(q, None, ctx, 16 if not decode else 1)[0, :, -1]  # [H, Nblk]
    assert (scores[:, 19] >= 16).all() and (scores[:, :19].amax(-1) < 16).all()


def test_centroids_of_an_epoch_ignore_keys_from_its_start_on():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 2, 500, 16, generator=g)
    method = Routing(block_size=16, clusters=8, epoch_tokens=128, iterations=3)
    sets, assigned = method.cluster(k)
    assert sets.shape == (2, 2, 4, 8, 16) and assigned.shape == (2, 2, 500)
    for epoch in range(1, 4):
        start = epoch * 128
        changed = k.clone()
        changed[:, :, start:] = torch.randn(2, 2, 500 - start, 16, generator=g)
        sets2, assigned2 = method.cluster(changed)
        assert torch.equal(sets[:, :, : epoch + 1], sets2[:, :, : epoch + 1])
        assert torch.equal(assigned[..., :start], assigned2[..., :start])
        if epoch + 1 < sets.shape[2]:  # the next set does learn from this epoch's keys
            assert not torch.equal(sets[:, :, epoch + 1], sets2[:, :, epoch + 1])


def test_centroids_learn_from_keys_and_padding_moves_none():
    g = torch.Generator().manual_seed(2)
    k = torch.randn(1, 1, 256, 16, generator=g)
    method = Routing(block_size=16, clusters=4, epoch_tokens=64)
    sets, _ = method.cluster(k)
    assert torch.allclose(sets.norm(dim=-1), torch.ones(1, 1, 4, 4))
    assert not torch.equal(sets[:, :, 0], sets[:, :, 1])  # epoch 0's keys moved the random initial centroids
    key_mask = torch.ones(1, 256, dtype=torch.bool)
    key_mask[:, :40] = False
    garbage = k.clone()
    garbage[:, :, :40] = torch.randn(1, 1, 40, 16, generator=g) * 100
    assert torch.equal(method.cluster(k, key_mask)[0], method.cluster(garbage, key_mask)[0])


@pytest.mark.parametrize(
    "config, match",
    [
        ({"clusters": 0}, "clusters"),
        ({"clusters": 2.0}, "clusters"),
        ({"route_top": 0}, "route_top"),
        ({"clusters": 4, "route_top": 5}, r"route_top must lie in \[1, clusters=4\]"),
        ({"iterations": 0}, "iterations"),
        ({"epoch_tokens": 0}, "epoch_tokens"),
        ({"block_size": 16, "epoch_tokens": 24}, "epoch_tokens must be a positive multiple of block_size=16"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_bad_config_names_the_field(config, match):
    with pytest.raises(ValueError, match=match):
        longattn.get_method("routing", **config)


def test_deterministic_per_seed_and_seeds_differ():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)

    def indices(seed: int) -> torch.Tensor:
        method = Routing(block_size=16, top_k=2, window=0, sink_tokens=0, clusters=8, route_top=1, seed=seed)
        return _select(method, q, k).indices

    assert torch.equal(indices(0), indices(0))
    assert any(not torch.equal(indices(0), indices(seed)) for seed in range(1, 4))


@pytest.mark.parametrize("padded", [False, True])
def test_decode_extends_the_clustering_and_selects_as_a_fresh_one(padded, monkeypatch):
    """Steps that stay inside the last epoch only assign their new keys (no clustering of the cache); every step
    selects exactly what clustering the whole cache again would, across an epoch boundary too."""
    g = torch.Generator().manual_seed(5)
    k = torch.randn(2, 2, 300, 16, generator=g)
    q = torch.randn(2, 4, 300, 16, generator=g)
    mask = torch.ones(2, 300, dtype=torch.bool)
    if padded:
        mask[1, :37] = False
    config = dict(block_size=16, top_k=3, window=16, sink_tokens=0, clusters=8, epoch_tokens=128)
    method, reference = Routing(**config), Routing(**config)
    calls = []
    cluster = method.cluster
    monkeypatch.setattr(method, "cluster", lambda *a, **kw: calls.append(a[0].shape[2]) or cluster(*a, **kw))
    memory: dict = {}

    def ctx(tk, tq, memo):
        return SelectionContext(kv_len=tk, q_offset=tk - tq, layer=0, num_kv_heads=2, keys=k[:, :, :tk],
                                key_mask=mask[:, :tk] if padded else None, memory=memo)

    method.select(q[:, :, :200], None, ctx(200, 200, memory))
    for tk in range(201, 280):
        step = q[:, :, tk - 1 : tk]
        kept = method.select(step, None, ctx(tk, 1, memory))
        fresh = reference.select(step, None, ctx(tk, 1, None))
        assert torch.equal(kept.indices, fresh.indices) and torch.equal(kept.counts, fresh.counts), tk
        routes, state = reference.routes(ctx(tk, 1, None)), memory["routing"]
        assert torch.equal(state["sets"], routes.centroids)
        assert torch.equal(state["hist"].view(2, 2, routes.centroids.shape[2], -1, 8).transpose(-1, -2),
                           routes.histogram)
        nkb = routes.mean_key.shape[2]
        torch.testing.assert_close(state["sums"][:, :, :nkb] / state["valid"][:, :, :nkb, None].clamp(min=1),
                                   routes.mean_key)
    # Clustered twice: the prompt (200 keys, two 128-token epochs) and the step that opens the third epoch.
    assert calls == [200, 257]


def test_a_cache_that_does_not_continue_the_remembered_keys_is_clustered_again():
    g = torch.Generator().manual_seed(6)
    k = torch.randn(1, 2, 200, 16, generator=g)
    q = torch.randn(1, 4, 200, 16, generator=g)
    method = Routing(block_size=16, top_k=2, window=16, sink_tokens=0, clusters=8, epoch_tokens=128)
    memory: dict = {}
    ctx = lambda keys, tq: SelectionContext(kv_len=keys.shape[2], q_offset=keys.shape[2] - tq, layer=0,  # noqa: E731
                                            num_kv_heads=2, keys=keys, memory=memory)
    method.select(q[:, :, :150], None, ctx(k[:, :, :150], 150))
    other = k.clone()
    other[:, :, :150] = torch.randn(1, 2, 150, 16, generator=g)  # a reordered / different sequence, same length
    kept = method.select(q[:, :, 150:151], None, ctx(other[:, :, :151], 1))
    fresh = method.select(q[:, :, 150:151], None, SelectionContext(kv_len=151, q_offset=150, layer=0,
                                                                 num_kv_heads=2, keys=other[:, :, :151]))
    assert torch.equal(kept.indices, fresh.indices)
