"""The SDPA dense path against naive block-sparse attention with every block selected."""

from __future__ import annotations

import pytest
import torch

from longattn.core.selection import Selection
from longattn.ops import block_sparse_attention_naive
from longattn.ops.dense import dense_attention, sliding_window_attention, sliding_window_attention_naive


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


# --- sliding-window attention (the model's sliding layers) against its definition --------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["all-keys", "padded"])
@pytest.mark.parametrize("window,chunk", [(1, 7), (5, 3), (24, 16), (200, 64)])
@pytest.mark.parametrize("tq,tk", [(90, 90), (1, 90), (30, 90)], ids=["prefill", "decode", "chunk"])
def test_sliding_window_equals_its_definition(tq, tk, window, chunk, padded):
    g = torch.Generator().manual_seed(window + tq)
    q, k, v = torch.randn(2, 4, tq, 16, generator=g), torch.randn(2, 2, tk, 16, generator=g), torch.randn(2, 2, tk, 16, generator=g)
    key_mask = None
    if padded:
        key_mask = torch.ones(2, tk, dtype=torch.bool)
        key_mask[1, :13] = False
    ref = sliding_window_attention_naive(q, k, v, window, 0.3, key_mask)
    out = sliding_window_attention(q, k, v, window, 0.3, key_mask, chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if window < tk:  # guard: the window really leaves keys out
        full = sliding_window_attention_naive(q, k, v, tk, 0.3, key_mask)
        assert (full - ref).abs().max() > 1e-3


def test_sliding_window_rejects_bad_arguments():
    q = k = v = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        sliding_window_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        sliding_window_attention(q, k, v, 4, chunk=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("hq", "hkv", "tq", "tk"), [(6, 2, 40, 300), (4, 4, 1, 2), (3, 1, 17, 18)])
def test_chunk_attention_equals_the_masked_pass(dtype, hq, hkv, tq, tk):
    """A prefill chunk as two fused passes merged by lse (no [Tq, Tk] mask) equals one masked SDPA pass."""
    from longattn.ops.dense import _masked_sdpa, chunk_attention

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, t, 32, generator=g).to(dtype) for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))
    allowed = torch.arange(tk).view(1, -1) <= (tk - tq + torch.arange(tq)).view(-1, 1)
    ref = _masked_sdpa(q.float(), k.float(), v.float(), allowed.view(1, 1, tq, tk), 0.17)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(chunk_attention(q, k, v, 0.17).float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dense_attention(q, k, v, 0.17).float(), ref, rtol=tol, atol=tol)
