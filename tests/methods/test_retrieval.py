"""Retrieval: exactly the top-k keys by inner product, the oracle the block methods approximate."""

from __future__ import annotations

import torch

import longattn
from tests.methods.helpers import select, token_mask


def test_decode_selects_exactly_the_top_k_keys_outside_sinks_and_window():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 2, 300, 8, generator=g)
    sel = select(longattn.get_method("retrieval", top_k=20, window=32, sink_tokens=4), q, k)
    mask = token_mask(sel, 300)[0, :, 0]  # [H, Tk]
    scores = torch.einsum("hd,hkd->hk", q[0, :, 0], k[0].repeat_interleave(2, dim=0))
    for h in range(4):
        middle = scores[h, 4:300 - 33]  # neither sinks nor the window (the query's own token is key 299)
        expected = set((middle.topk(20).indices + 4).tolist())
        got = set(mask[h].nonzero().flatten().tolist()) - set(range(4)) - set(range(300 - 33, 300))
        assert got == expected


def test_block_scores_are_the_best_key_of_each_block():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 1, 64, 8, generator=g)
    sel = select(longattn.get_method("retrieval", block_size=16, top_k=1, window=0, sink_tokens=0), q, k)
    best = int(torch.einsum("hd,kd->hk", q[0, :, 0], k[0, 0])[:, :48].argmax(-1)[0]) // 16  # block 3 is the query's
    assert best in sel.indices[0, 0, 0].tolist()
