"""The SDPA dense fast path against its reference, the block-sparse operator with every block selected."""

from __future__ import annotations

import pytest
import torch

from longattn.core.selection import Selection
from longattn.ops import block_sparse_attention_reference
from longattn.ops.dense import dense_attention


@pytest.mark.parametrize("tq, tk", [(96, 96), (1, 96), (40, 96)], ids=["prefill", "decode", "chunked"])
@pytest.mark.parametrize("padded", [False, True])
def test_dense_attention_equals_all_blocks_operator(tq, tk, padded):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, tq, 16, generator=g), torch.randn(2, 2, tk, 16, generator=g), torch.randn(2, 2, tk, 16, generator=g)
    key_mask = None
    if padded:
        key_mask = torch.ones(2, tk, dtype=torch.bool)
        key_mask[1, :70] = False  # some padding-query rows see nothing
    nq = -(-tq // 16)
    sel = Selection.from_mask(torch.ones(2, 6, nq, -(-tk // 16), dtype=torch.bool), 16, 16)
    ref, _ = block_sparse_attention_reference(q, k, v, sel, key_mask=key_mask)
    out = dense_attention(q, k, v, key_mask=key_mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
