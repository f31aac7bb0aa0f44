"""The SDPA dense path against naive block-sparse attention with every block selected."""

from __future__ import annotations

import pytest
import torch

from longattn.core.selection import Selection
from longattn.ops import block_sparse_attention_naive
from longattn.ops.dense import dense_attention


@pytest.mark.parametrize("tq, tk, q_offset", [(96, 96, None), (1, 96, None), (40, 96, None), (40, 96, 20), (1, 96, 50)],
                         ids=["prefill", "decode", "chunked", "chunk-in-the-middle", "decode-in-the-middle"])
@pytest.mark.parametrize("padded", [False, True])
def test_dense_attention_equals_all_blocks_operator(tq, tk, q_offset, padded):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, tq, 16, generator=g), torch.randn(2, 2, tk, 16, generator=g), torch.randn(2, 2, tk, 16, generator=g)
    key_mask = None
    if padded:
        key_mask = torch.ones(2, tk, dtype=torch.bool)
        key_mask[1, :70] = False  # some padding-query rows see nothing
    nq = -(-tq // 16)
    sel = Selection.from_mask(torch.ones(2, 6, nq, -(-tk // 16), dtype=torch.bool), 16, 16)
    ref, _ = block_sparse_attention_naive(q, k, v, sel, key_mask=key_mask, q_offset=q_offset)
    out = dense_attention(q, k, v, key_mask=key_mask, q_offset=q_offset)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
