"""Quest: the min/max bound really bounds every key's score and finds a block's single salient key."""

from __future__ import annotations

import torch

import longattn
from longattn.core.index import minmax_summary
from tests.methods.helpers import select, token_mask


def test_bound_is_at_least_every_keys_score_and_tight_for_one_key_blocks():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    quest = longattn.get_method("quest", block_size=16)
    bound = quest.score(q, minmax_summary(k.view(1, 2, 4, 16, 8)))  # [1, 4, 5, 4]
    exact = torch.einsum("bhtd,bhkd->bhtk", q, k.repeat_interleave(2, dim=1)).view(1, 4, 5, 4, 16).amax(-1)
    assert bool((bound >= exact - 1e-5).all())
    one = longattn.get_method("quest", block_size=1).score(q, minmax_summary(k.view(1, 2, 64, 1, 8)))
    torch.testing.assert_close(one, torch.einsum("bhtd,bhkd->bhtk", q, k.repeat_interleave(2, dim=1)))


def test_finds_the_block_with_one_salient_key_that_a_mean_dilutes():
    g = torch.Generator().manual_seed(1)
    d = 16
    q = torch.randn(1, 2, 1, d, generator=g)
    k = torch.randn(1, 1, 160, d, generator=g) * 0.3
    direction = q[0, 0, 0] / q[0, 0, 0].norm()
    k[:, :, 40] = 4 * direction  # one salient key in block 2
    k[:, :, 80:96] += 0.6 * direction  # block 5: every key mildly aligned, a higher mean than block 2's
    q[:, 1] = q[:, 0]
    config = dict(block_size=16, top_k=1, window=0, sink_tokens=0)
    quest = token_mask(select(longattn.get_method("quest", **config), q, k), 160)[0, 0, 0]
    moba = token_mask(select(longattn.get_method("moba", **config), q, k), 160)[0, 0, 0]
    assert quest[40] and not quest[80]
    assert moba[80] and not moba[40]  # the contrast that makes Quest worth having
