"""LongHeads: attention-pooled chunk representations and per-head chunk choice."""

from __future__ import annotations

import torch

import longattn
from longattn.core.index import attention_pooled_summary, mean_summary
from tests.methods.helpers import select, token_mask


def test_pooled_representation_leans_towards_the_chunks_dominant_keys():
    k = torch.zeros(1, 1, 1, 8, 4)
    k[..., :, 0] = 1.0  # every key shares a component ...
    k[..., 0, 1] = 6.0  # ... and one key is far larger along another
    pooled, mean = attention_pooled_summary(k)[..., 0, :], mean_summary(k)[..., 0, :]
    assert pooled[..., 1] > 2 * mean[..., 1]
    torch.testing.assert_close(attention_pooled_summary(torch.ones(1, 1, 2, 4, 3)), mean_summary(torch.ones(1, 1, 2, 4, 3)))


def test_heads_pick_their_own_chunks_and_together_cover_more():
    g = torch.Generator().manual_seed(0)
    d = 16
    q = torch.randn(1, 4, 16, d, generator=g) * 0.05
    k = torch.randn(1, 4, 320, d, generator=g) * 0.05
    targets = [2, 6, 10, 14]  # chunk wanted by each head
    for h, chunk in enumerate(targets):
        direction = torch.randn(d, generator=g)
        k[:, h, chunk * 16 : chunk * 16 + 16] += direction
        q[:, h] += direction
    sel = select(longattn.get_method("longheads", block_size=16, top_k=1, window=16, sink_tokens=16), q, k)
    mask = token_mask(sel, 320)[0, :, -1]  # [H, Tk] of the last query block
    for h, chunk in enumerate(targets):
        assert mask[h, chunk * 16] and sum(bool(mask[h, c * 16]) for c in targets) == 1
    assert mask[:, 0].all()  # the first chunk is always kept
