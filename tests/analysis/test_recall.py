"""Attention recall: exact against a dense T x T reference on small shapes, 1.0 for dense, < 1 when sparse."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.analysis import RecallRecorder, attention_recall, sample_positions
from longattn.core.index import BlockIndex
from longattn.core.selection import Selection
from longattn.methods.base import SelectionContext
from tests.conftest import tiny_model


def _dense_reference(q, k, selection, scale, rows):
    """Recall from the full [Tq, Tk] probability matrix and the token-level selection mask (test-only)."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(hq // hkv, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * scale
    causal = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    nblk = -(-tk // selection.kv_block_size)
    blocks = selection.to_mask(nblk).repeat_interleave(hq // selection.num_heads, dim=1)
    tokens = blocks.repeat_interleave(selection.query_block_size, 2)[:, :, :tq].repeat_interleave(
        selection.kv_block_size, 3)[..., :tk]
    return (probs * tokens)[:, :, rows].sum(-1)


@pytest.mark.parametrize("tq,tk", [(40, 40), (1, 37), (16, 50)])
def test_recall_matches_dense_reference(tq, tk):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, tq, 8), torch.randn(2, 2, tk, 8)
    method = longattn.get_method("moba", block_size=4, top_k=2, window=4, sink_tokens=1)
    summaries = BlockIndex(4, "mean").update(k, 0)
    ctx = SelectionContext(kv_len=tk, q_offset=tk - tq, layer=0, num_kv_heads=2, key_mask=None, device=q.device)
    sel = method.select(q, summaries, ctx)
    rows = sample_positions(tq, 5)
    got = attention_recall(q, k, sel, 0.3, rows)
    assert torch.allclose(got, _dense_reference(q, k, sel, 0.3, rows), atol=1e-5)
    if tk > 16:
        assert float(got.min()) < 0.999  # 2 of ~10 blocks cannot hold all the mass of random keys


def test_full_selection_has_recall_one_and_positions_are_spread():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    ctx = SelectionContext(kv_len=64, q_offset=0, layer=0, num_kv_heads=2, key_mask=None, device=q.device)
    sel = longattn.get_method("dense", use_sdpa=False, block_size=8).select(q, None, ctx)
    rows = sample_positions(64, 8)
    assert rows.tolist() == [7, 15, 23, 31, 39, 47, 55, 63]
    assert torch.allclose(attention_recall(q, k, sel, 0.35, rows), torch.ones(1, 2, 8))
    with pytest.raises(ValueError, match="positions"):
        attention_recall(q, k, sel, 0.35, torch.tensor([64]))


def test_recall_ignores_padding_keys():
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[:, :8] = False
    # Selecting only the padding blocks plus the diagonal: the padding holds no mass once masked.
    blocks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    blocks[..., 0] = True
    blocks[:, :, torch.arange(4), torch.arange(4)] = True
    sel = Selection.from_mask(blocks, 8, 8)
    rows = torch.tensor([31])
    masked = attention_recall(q, k, sel, 0.35, rows, key_mask=mask)
    plain = attention_recall(q, k, sel, 0.35, rows)
    assert not torch.allclose(masked, plain)
    assert float(masked.max()) < 1.0


@pytest.mark.parametrize("name,expect_one", [("dense", True), ("streaming", False), ("moba", False)])
def test_recorder_on_a_model(name, expect_one):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 96))
    small = {} if name == "dense" else {"block_size": 8, "window": 8, "sink_tokens": 4}
    if name == "moba":
        small["top_k"] = 1
    recorder = RecallRecorder(num_queries=8)
    with longattn.apply(model, longattn.get_method(name, **small), observer=recorder):
        model(ids)
        model(ids[:, :1], past_key_values=None)  # a fresh 1-token prompt is prefill-free: skipped
    summary = recorder.summary()
    assert summary is not None and len(summary["per_layer_mean"]) == model.config.num_hidden_layers
    if expect_one:
        assert summary["mean"] == pytest.approx(1.0, abs=1e-5) and summary["p10"] == pytest.approx(1.0, abs=1e-5)
    else:
        assert summary["mean"] < 0.99 and summary["p10"] <= summary["mean"]


def test_apply_rejects_a_non_callable_observer():
    with pytest.raises(ValueError, match="observer"):
        longattn.apply(tiny_model("llama"), longattn.get_method("dense"), observer=3)
