"""InfLLM: representative keys are the ones the block's own queries attend, and they decide retrieval."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.methods.infllm import RepresentativeSummary
from tests.methods.helpers import select, token_mask


def test_representatives_are_the_keys_the_blocks_queries_score_highest():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 2, 8, 4, generator=g) * 0.1  # [B, Hkv, N, L, D]
    q = torch.randn(1, 2, 2, 8, 4, generator=g) * 0.1  # two query heads read the one KV head
    direction = torch.tensor([1.0, 0.0, 0.0, 0.0])
    k[0, 0, 0, 2] += 3 * direction  # key 2 of block 0 ...
    q[0, :, 0, 3:] += direction  # ... is what the block's later queries look for
    reps = RepresentativeSummary(1)(k, q)
    torch.testing.assert_close(reps[0, 0, 0, 0], k[0, 0, 0, 2])
    # Without queries the keys stand in for them (a key scores highest against itself and its look-alikes).
    assert RepresentativeSummary(2)(k, None).shape == (1, 1, 2, 2, 4)


def test_partial_block_shorter_than_the_count_repeats_its_best_key():
    k = torch.randn(1, 1, 1, 2, 4)
    reps = RepresentativeSummary(4)(k, None)
    assert reps.shape == (1, 1, 1, 4, 4)
    assert torch.equal(reps[0, 0, 0, 2], reps[0, 0, 0, 0])


def test_retrieves_the_block_whose_representative_matches():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 160, 8, generator=g) * 0.1
    k = torch.randn(1, 1, 160, 8, generator=g) * 0.1
    direction = torch.randn(8, generator=g)
    k[:, :, 50] += 3 * direction
    q[:, :, 51:64] += direction  # block 3's own queries attend key 50, making it a representative
    q[:, :, -16:] += direction
    sel = select(longattn.get_method("infllm", block_size=16, top_k=1, window=0, sink_tokens=0, representatives=1), q, k)
    assert token_mask(sel, 160)[0, :, -1, 50].all()


@pytest.mark.parametrize("value", [0, 17])
def test_representatives_out_of_range(value):
    with pytest.raises(ValueError, match="representatives"):
        longattn.get_method("infllm", block_size=16, representatives=value)
