"""Attention recall: exact against a dense T x T reference on small shapes, 1.0 for dense, < 1 when sparse."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.analysis import RecallRecorder, attention_recall, output_error, recall_and_oracle, sample_positions
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


def test_oracle_holds_the_best_blocks_at_the_selection_budget():
    torch.manual_seed(4)
    q, k = torch.randn(1, 2, 48, 8), torch.randn(1, 1, 48, 8)
    rows = torch.tensor([15, 31, 47])
    sel = longattn.get_method("moba", block_size=8, window=0, sink_tokens=0, top_k=1, query_block_size=16)
    ctx = SelectionContext(kv_len=48, q_offset=0, layer=0, num_kv_heads=1, keys=k)
    selection = sel.select(q, BlockIndex(8).update(k, 0), ctx)
    recall, oracle = recall_and_oracle(q, k, selection, 0.35, rows)
    torch.testing.assert_close(recall, attention_recall(q, k, selection, 0.35, rows))
    # The oracle from the dense rows: the heaviest `count` blocks of each row.
    probs = torch.softmax((q[:, :, rows] @ k.transpose(-1, -2) * 0.35).masked_fill(
        torch.arange(48).view(1, -1) > rows.view(-1, 1), float("-inf")), -1)
    mass = probs.view(1, 2, 3, 6, 8).sum(-1)
    counts = selection.to_mask(6)[:, :, rows // 16].sum(-1)
    want = torch.stack([mass[0, h, i].sort(descending=True).values[: counts[0, h, i]].sum()
                        for h in range(2) for i in range(3)]).view(1, 2, 3)
    torch.testing.assert_close(oracle, want)
    assert bool((oracle >= recall - 1e-6).all()) and bool((oracle > recall + 1e-3).any())


def test_output_error_is_zero_for_dense_and_positive_for_a_sparse_output():
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 2, 64, 8), torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    rows = torch.tensor([20, 63])
    dense = longattn.ops.dense_attention(q, k, v, 0.35)
    assert float(output_error(q, k, v, dense, 0.35, rows).max()) < 1e-5
    m = longattn.get_method("streaming", block_size=8, window=8, sink_tokens=0)
    ctx = SelectionContext(kv_len=64, q_offset=0, layer=0, num_kv_heads=1)
    out, _ = longattn.block_sparse_attention(q, k, v, m.select(q, None, ctx), 0.35, causal=True)
    assert float(output_error(q, k, v, out, 0.35, rows).min()) > 1e-3


def test_recorder_reports_oracle_and_output_error_through_a_model():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 96))
    recorder = RecallRecorder(num_queries=8)
    m = longattn.get_method("moba", block_size=8, window=8, sink_tokens=4, top_k=1)
    with longattn.apply(model, m, observer=recorder):
        model(ids)
    s = recorder.summary()
    layers = model.config.num_hidden_layers
    assert len(s["per_layer_oracle"]) == layers and len(s["per_layer_output_error"]) == layers
    assert s["oracle_mean"] >= s["mean"] and s["output_error_mean"] > 0
    recorder.reset()
    with longattn.apply(model, longattn.get_method("dense"), observer=recorder):
        model(ids)
    assert recorder.summary()["output_error_mean"] < 1e-4
