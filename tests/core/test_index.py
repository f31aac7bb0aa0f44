"""BlockIndex: incremental summaries equal summaries computed from scratch."""

from __future__ import annotations

import pytest
import torch

from longattn.core.index import BlockIndex


@pytest.mark.parametrize("summary, r", [("mean", 1), ("minmax", 2)])
def test_incremental_update_equals_from_scratch(summary, r):
    torch.manual_seed(0)
    k = torch.randn(2, 3, 100, 8)
    index = BlockIndex(16, summary)
    index.update(k[:, :, :37], layer=0)  # prefill
    for t in range(38, 101):  # decode, one token at a time
        got = index.update(k[:, :, :t], layer=0)
    blocks = torch.nn.functional.pad(k, (0, 0, 0, 12)).view(2, 3, 7, 16, 8)
    expect = blocks[:, :, :6].mean(3) if summary == "mean" else blocks[:, :, :6].amin(3)
    assert got.shape == (2, 3, 7, r, 8)
    torch.testing.assert_close(got[:, :, :6, 0], expect)
    tail = k[:, :, 96:]
    torch.testing.assert_close(got[:, :, 6, 0], tail.mean(2) if summary == "mean" else tail.amin(2))
    assert index.indexed_tokens(0) == 96


def test_new_sequence_in_same_layer_is_reindexed():
    torch.manual_seed(0)
    a, b = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 80, 8)
    index = BlockIndex(16, "mean")
    index.update(a, layer=3)
    got = index.update(b, layer=3)  # longer, but another sequence: stale summaries must not be reused
    torch.testing.assert_close(got[..., 0, :], b.view(1, 2, 5, 16, 8).mean(3))


def test_layers_are_independent():
    index = BlockIndex(4, "mean")
    index.update(torch.ones(1, 1, 8, 2), layer=0)
    assert index.update(torch.zeros(1, 1, 8, 2), layer=1).sum() == 0
    assert index.indexed_tokens(0) == 8 and index.indexed_tokens(1) == 8
    index.reset_layer(0)
    assert index.indexed_tokens(0) == 0 and index.indexed_tokens(1) == 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        BlockIndex(0)
    with pytest.raises(ValueError, match="summary"):
        BlockIndex(16, "median")
    with pytest.raises(ValueError, match="k must be"):
        BlockIndex(16).update(torch.zeros(3, 4, 5), layer=0)
