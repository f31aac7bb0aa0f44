"""Head instruments: a planted copying head is found, a local head streams, a planted sink is mapped, and
profiles round-trip and refuse what they cannot serve."""

from __future__ import annotations

import math

import pytest
import torch

from longattn.analysis.heads import HeadRecorder
from longattn.bench.profiling import copy_hits
from longattn.ops.sampled import local_mass, sampled_attention
from longattn.core.selection import Selection
from tests.conftest import tiny_model

CODES = 32  # tokens 0..31 carry an angle code; the copying head looks for the code after its input's


def copying_model():
    """A tiny Llama whose layer-1 head 0 copies: from input token x it attends the prompt position holding
    x + 1 and writes that token to the logits. Everything else adds nothing to the residual stream.

    Token x < 32 embeds as the angle 2 pi x / 32 in dims (0, 1); other tokens in one of dims 4..63. The head's
    query is its input's angle turned by one step and its key the plain angle, both in the RoPE pair (7, 15)
    whose frequency is ~0 at rope_theta 1e8, so the match does not depend on distance.
    """
    model = tiny_model("llama", rope_theta=1e8)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        angle = 2 * math.pi * torch.arange(CODES) / CODES
        emb = model.model.embed_tokens.weight
        emb[:CODES, 0], emb[:CODES, 1] = torch.cos(angle), torch.sin(angle)
        for t in range(CODES, 256):
            emb[t, 4 + t % 60] = 1.0
        for norm in [model.model.norm] + [m for layer in model.model.layers
                                          for m in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.weight.fill_(1.0)
        attn = model.model.layers[1].self_attn
        step, gain = 2 * math.pi / CODES, 100.0
        attn.q_proj.weight[7, 0], attn.q_proj.weight[7, 1] = gain * math.cos(step), -gain * math.sin(step)
        attn.q_proj.weight[15, 0], attn.q_proj.weight[15, 1] = gain * math.sin(step), gain * math.cos(step)
        attn.k_proj.weight[7, 0], attn.k_proj.weight[15, 1] = 1.0, 1.0
        attn.v_proj.weight[0, 0], attn.v_proj.weight[1, 1] = 1.0, 1.0
        attn.o_proj.weight[2, 0], attn.o_proj.weight[3, 1] = 10.0, 10.0  # head 0's output -> dims (2, 3)
        lm = model.lm_head.weight
        lm[:CODES, 2], lm[:CODES, 3] = torch.cos(angle), torch.sin(angle)
    return model


def needle_prompt(length: int = 300, at: int = 100, seed: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Filler tokens >= 32, the needle 10..14 at ``at``, and the cue 9 last: ``[1, length]`` and the span."""
    ids = torch.randint(CODES, 256, (1, length), generator=torch.Generator().manual_seed(seed))
    ids[0, at : at + 5] = torch.arange(10, 15)
    ids[0, -1] = 9
    return ids, (at, at + 5)


def test_retrieval_score_finds_the_planted_copying_head():
    model = copying_model()
    scores = []
    for seed, at in ((0, 40), (1, 150), (2, 260)):
        ids, span = needle_prompt(at=at, seed=seed)
        generated, hits = copy_hits(model, ids, span, HeadRecorder(window=32), max_new_tokens=5)
        assert generated == [10, 11, 12, 13, 14]  # the model copies the needle
        scores.append(hits)
    score = torch.stack(scores).mean(0)
    assert score[1, 0] == pytest.approx(1.0)
    others = score.clone()
    others[1, 0] = 0
    assert float(others.max()) < 0.5


def test_retrieval_score_is_zero_when_nothing_is_copied():
    model = copying_model()
    ids, span = needle_prompt()
    ids[0, span[0] : span[1]] = 200  # no needle: the head finds nothing to copy
    generated, hits = copy_hits(model, ids, span, HeadRecorder(), max_new_tokens=5)
    assert generated != [10, 11, 12, 13, 14]
    assert float(hits.max()) == 0.0


def _local_and_far_heads(t: int = 400, d: int = 16, distance: int = 150):
    """q, k where head 0 attends its own position and head 1 the key ``distance`` back (else its own)."""
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(1, 2, t, d, generator=g), dim=-1) * 4
    q = torch.empty(1, 2, t, d)
    q[0, 0] = k[0, 0] * 8
    back = (torch.arange(t) - distance).clamp(min=0)
    back = torch.where(torch.arange(t) >= distance, back, torch.arange(t))
    q[0, 1] = k[0, 1, back] * 8
    return q, k


def test_streaming_score_is_one_for_a_local_head_and_near_zero_for_a_far_head():
    q, k = _local_and_far_heads()
    recorder = HeadRecorder(sink_tokens=4, window=64, sampled_queries=16)
    recorder(0, q, k, Selection.from_mask(torch.ones(1, 2, 25, 25, dtype=torch.bool), 16, 16), 0.25)
    streaming = recorder.streaming[0]
    assert streaming[0] > 0.99
    assert streaming[1] < 0.05


def test_local_mass_counts_sinks_and_window_exactly():
    probs = torch.zeros(1, 1, 1, 100)
    probs[..., 0], probs[..., 50], probs[..., 95] = 0.2, 0.5, 0.3  # sink, far, local for a row at 99
    assert float(local_mass(probs, torch.tensor([99]), sink_tokens=4, window=10)) == pytest.approx(0.5)


def test_sink_map_finds_a_planted_hidden_sink():
    g = torch.Generator().manual_seed(1)
    t, d = 512, 16
    k = torch.randn(1, 1, t, d, generator=g) * 0.1
    q = torch.randn(1, 1, t, d, generator=g) * 0.1
    k[0, 0, 137] = 0.0
    k[0, 0, 137, 0] = 3.0
    q[0, 0, :, 0] = 3.0  # every query likes key 137: a hidden sink
    recorder = HeadRecorder(sink_tokens=4, window=64, sampled_queries=16)
    recorder(0, q, k, Selection.from_mask(torch.ones(1, 1, 32, 32, dtype=torch.bool), 16, 16), 1.0)
    ratio = recorder.ratios[0][0]
    assert int(ratio.argmax()) == 137
    assert float(ratio[137]) > 50
    assert float(ratio[:137].max()) < 5


def test_sampled_attention_equals_dense_softmax_rows():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 40, 8, generator=g), torch.randn(1, 2, 50, 8, generator=g)
    rows = torch.tensor([0, 7, 39])
    probs = sampled_attention(q, k, 0.3, rows)
    kk = k.repeat_interleave(2, dim=1)
    full = (q @ kk.transpose(-1, -2)) * 0.3
    full = full.masked_fill(torch.ones(40, 50, dtype=torch.bool).tril(10).logical_not(), float("-inf")).softmax(-1)
    torch.testing.assert_close(probs, full[:, :, rows])


# ------------------------------------------------------------------------------------------------- profile


def test_sink_map_plot_labels_the_planted_sink(tmp_path):
    from longattn.bench.figures import sink_map

    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 512, 16, generator=g) * 0.1, torch.randn(1, 1, 512, 16, generator=g) * 0.1
    k[0, 0, 137] = 0.0
    k[0, 0, 137, 0], q[0, 0, :, 0] = 3.0, 3.0
    recorder = HeadRecorder(window=64)
    recorder(0, q, k, Selection.from_mask(torch.ones(1, 1, 32, 32, dtype=torch.bool), 16, 16), 1.0)
    path = sink_map(recorder, [(0, 0)], [f"t{i}" for i in range(512)], tmp_path / "s.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="layer 3"):
        sink_map(recorder, [(3, 0)], [], tmp_path / "x.png")
