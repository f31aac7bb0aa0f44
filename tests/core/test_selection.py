"""Selection: the BlockMask-compatible layout."""

from __future__ import annotations

import pytest
import torch

from longattn.core.selection import Selection


def test_from_mask_layout_and_roundtrip():
    mask = torch.tensor([[[[True, False, True, False], [False, False, False, False]]]])
    sel = Selection.from_mask(mask, 4, 4)
    assert sel.indices.dtype == torch.int32 and sel.counts.dtype == torch.int32
    assert sel.indices.tolist() == [[[[0, 2], [-1, -1]]]]
    assert sel.counts.tolist() == [[[2, 0]]]
    assert torch.equal(sel.to_mask(4), mask)


def test_validation_messages():
    sel = Selection.from_mask(torch.ones(1, 2, 2, 2, dtype=torch.bool), 16, 16)
    with pytest.raises(ValueError, match="batch"):
        sel.validate(32, 32, 2, 1, batch=2)
    bad_order = Selection(torch.tensor([[[[-1, 0]]]], dtype=torch.int32), torch.tensor([[[1]]], dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match="valid entries first"):
        bad_order.validate(4, 4, 1, 1, 1)
    with pytest.raises(ValueError, match="counts must be"):
        Selection(sel.indices, sel.counts[:, :1], 16, 16)
    with pytest.raises(ValueError, match="mask must be"):
        Selection.from_mask(torch.ones(2, 2, 2), 4, 4)


def test_concat_pads_to_the_widest_part():
    a = Selection.from_mask(torch.tensor([[[[True, False, False]]]]), 4, 4)
    b = Selection.from_mask(torch.tensor([[[[True, True, True], [False, True, False]]]]), 4, 4)
    joined = Selection.concat([a, b])
    assert joined.indices.tolist() == [[[[0, -1, -1], [0, 1, 2], [1, -1, -1]]]]
    assert joined.counts.tolist() == [[[1, 3, 1]]]
    with pytest.raises(ValueError, match="equal query_block_size"):
        Selection.concat([a, Selection.from_mask(torch.ones(1, 1, 1, 3, dtype=torch.bool), 8, 4)])


def test_counts_out_of_range_and_bad_block_sizes_raise():
    sel = Selection.from_mask(torch.ones(1, 1, 1, 2, dtype=torch.bool), 4, 4)
    too_many = Selection(sel.indices, sel.counts + 1, 4, 4)
    with pytest.raises(ValueError, match="counts must lie"):
        too_many.validate(4, 8, 1, 1, 1)
    with pytest.raises(ValueError, match="query_block_size"):
        Selection(sel.indices, sel.counts, 16.0, 4)
    with pytest.raises(ValueError, match="kv_block_size"):
        Selection(sel.indices, sel.counts, 4, True)
    with pytest.raises(ValueError, match=r"\[B, H\]"):
        Selection.concat([sel, Selection.from_mask(torch.ones(1, 2, 1, 2, dtype=torch.bool), 4, 4)])


def test_dense_heads_travel_with_the_selection():
    flags = torch.tensor([True, False])
    a = Selection.from_mask(torch.ones(1, 2, 1, 2, dtype=torch.bool), 4, 4, dense_heads=flags)
    b = Selection.from_mask(torch.tensor([[[[True, True]], [[False, True]]]]), 4, 4, dense_heads=flags)
    joined = Selection.concat([a, b])
    assert joined.dense_heads == tuple(flags.tolist()) and joined.counts.tolist() == [[[2, 2], [2, 1]]]
    assert joined.without_dense_heads().dense_heads is None and joined.dense_heads == (True, False)
    plain = Selection.from_mask(torch.ones(1, 2, 1, 2, dtype=torch.bool), 4, 4)
    for other in (plain, Selection.from_mask(torch.ones(1, 2, 1, 2, dtype=torch.bool), 4, 4, dense_heads=~flags)):
        with pytest.raises(ValueError, match="equal dense_heads"):
            Selection.concat([a, other])
    with pytest.raises(ValueError, match=r"dense_heads must be H=2 bools"):
        Selection.from_mask(torch.ones(1, 2, 1, 2, dtype=torch.bool), 4, 4, dense_heads=torch.tensor([1, 0]))
