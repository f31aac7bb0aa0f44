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


def test_cropped_and_regrown_cache_is_reindexed():
    torch.manual_seed(0)
    a = torch.randn(1, 2, 96, 8)
    b = torch.cat([a[:, :, :50], torch.randn(1, 2, 60, 8)], dim=2)  # crop to 50, then 60 new keys
    index = BlockIndex(16, "mean")
    index.update(a, layer=0, new_tokens=96)
    got = index.update(b, layer=0, new_tokens=60)
    torch.testing.assert_close(got, BlockIndex(16, "mean").update(b, layer=0))


def test_reordered_batch_rows_are_reindexed():
    torch.manual_seed(0)
    k = torch.randn(2, 2, 64, 8)
    index = BlockIndex(16, "minmax")
    index.update(k, layer=0, new_tokens=64)
    beams = torch.cat([k[[1, 0]], torch.randn(2, 2, 1, 8)], dim=2)  # beam search swapped the rows
    got = index.update(beams, layer=0, new_tokens=1)
    torch.testing.assert_close(got, BlockIndex(16, "minmax").update(beams, layer=0))


def test_continuing_sequence_reuses_stored_blocks():
    torch.manual_seed(0)
    k = torch.randn(1, 2, 80, 8)
    index = BlockIndex(16, "mean")
    index.update(k[:, :, :64], layer=0, new_tokens=64)
    calls = []
    index._fn = lambda blocks: calls.append(blocks.shape[2]) or blocks.float().mean(3, keepdim=True)
    index.update(k, layer=0, new_tokens=16)
    assert calls == [1]  # only the newly filled block was summarised


def test_bad_custom_summary_shape_raises():
    index = BlockIndex(4, lambda blocks: blocks.float().mean(3))  # drops the R dimension
    with pytest.raises(ValueError, match="summary must map"):
        index.update(torch.zeros(1, 1, 8, 2), layer=0)


class _RecordingSummary:
    """Mean key plus mean query of each block, so a test can see which queries the index passed."""

    uses_queries = True

    def __call__(self, blocks, queries):
        if queries is None:
            return torch.full_like(blocks[:, :, :, :1].float(), float("nan"))
        return queries.float().view(*blocks.shape[:2], -1, *blocks.shape[2:]).mean(dim=(2, 4)).unsqueeze(3)


def test_query_summaries_see_each_blocks_own_queries_in_prefill_and_decode():
    torch.manual_seed(0)
    k, q = torch.randn(1, 2, 70, 4), torch.randn(1, 4, 70, 4)
    index = BlockIndex(16, _RecordingSummary())
    index.update(k[:, :, :21], layer=0, new_tokens=21, q=q[:, :, :21])  # prefill ends inside block 1
    for t in range(22, 71):  # decode: block 1's queries come from the prefill and from 11 decode steps
        got = index.update(k[:, :, :t], layer=0, new_tokens=1, q=q[:, :, t - 1 : t])
    expect = torch.nn.functional.pad(q, (0, 0, 0, 10)).view(1, 2, 2, 5, 16, 4).mean(dim=(2, 4))  # [1, 2, 5, 4]
    torch.testing.assert_close(got[:, :, :4, 0], expect[:, :, :4])
    torch.testing.assert_close(got[:, :, 4, 0], q[:, :, 64:].view(1, 2, 2, 6, 4).mean(dim=(2, 3)))


def test_query_summaries_fall_back_to_keys_when_queries_are_missing():
    k, q = torch.randn(1, 2, 40, 4), torch.randn(1, 4, 8, 4)
    got = BlockIndex(16, _RecordingSummary()).update(k, layer=0, q=q)  # 8 queries cannot cover 40 positions
    assert torch.isnan(got).all()
