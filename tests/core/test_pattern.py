"""The shared sinks + window + causal pattern: its ranges equal a token-level definition, its three views
(masks, ids, the dropped run) agree with each other, and a session builds it once per step."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.core.pattern import StepPattern
from tests.conftest import tiny_model


def _by_definition(q_len, kv_len, q_offset, bs, qbs, sinks, window, key_mask=None):
    """``[B, Qblk, Nblk]`` bool from the words: a block is static for a query block when it holds one of the
    row's first ``sinks`` valid keys (and some query of the block may see it), or lies in the window: from
    the block holding ``first - window`` (never after the query block's own first block) to its last block."""
    b = 1 if key_mask is None else key_mask.shape[0]
    nqb, nkb = -(-q_len // qbs), -(-kv_len // bs)
    out = torch.zeros(b, nqb, nkb, dtype=torch.bool)
    for row in range(b):
        start = 0 if key_mask is None else int(key_mask[row].int().argmax())
        for j in range(nqb):
            first = q_offset + j * qbs
            last = min(first + qbs, q_offset + q_len) - 1
            lo = min(max(first - window, 0) // bs, first // bs)
            for n in range(nkb):
                keys = range(n * bs, min(n * bs + bs, kv_len))
                sink = any(start <= p < start + sinks for p in keys)
                out[row, j, n] = n <= last // bs and (sink or n >= lo)
    return out


SHAPES = [  # q_len, kv_len, q_offset, bs, qbs, sinks, window
    (64, 64, 0, 16, 16, 4, 16), (40, 100, 60, 16, 8, 4, 32), (1, 100, 99, 16, 1, 4, 16),
    (64, 64, 0, 8, 16, 0, 0), (30, 30, 0, 4, 4, 20, 3), (96, 200, 104, 32, 16, 64, 0),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"Tq{s[0]}-Tk{s[1]}-bs{s[3]}-qbs{s[4]}-S{s[5]}-W{s[6]}" for s in SHAPES])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "left-padded"])
def test_static_mask_is_the_token_level_definition(shape, padded):
    q_len, kv_len, q_offset, bs, qbs, sinks, window = shape
    key_mask = None
    if padded:
        key_mask = torch.ones(2, kv_len, dtype=torch.bool)
        key_mask[1, : kv_len // 3 + 1] = False
    p = StepPattern.build(q_len, kv_len, q_offset, bs, qbs, sinks, window, key_mask)
    expected = _by_definition(q_len, kv_len, q_offset, bs, qbs, sinks, window, key_mask)
    assert torch.equal(p.static_mask()[:, 0].expand_as(expected), expected)
    # ids are the same blocks as the mask
    ids, kept = p.static_ids(expected.shape[0])
    from_ids = torch.zeros(expected.shape[0], p.num_q_blocks, p.num_kv_blocks + 1, dtype=torch.bool)
    from_ids.scatter_(-1, torch.where(kept, ids, p.num_kv_blocks)[:, 0].clamp(max=p.num_kv_blocks), True)
    assert torch.equal(from_ids[..., :-1], expected)
    # a streaming head's dropped run is exactly the causal blocks it does not keep (between sinks and window)
    lo, hi = p.dropped_run(expected.shape[0])
    blocks = torch.arange(p.num_kv_blocks)
    run = (blocks >= lo.unsqueeze(-1)) & (blocks < hi.unsqueeze(-1))
    assert not (run & expected).any()
    causal_from_sinks = (blocks >= p.sink_lo.view(-1, 1, 1)) & (blocks <= p.causal_hi.view(1, -1, 1))
    assert torch.equal(run | expected | ~causal_from_sinks, torch.ones_like(run) | ~causal_from_sinks)


def test_eligible_excludes_static_future_and_padding_blocks():
    key_mask = torch.ones(1, 64, dtype=torch.bool)
    key_mask[0, :20] = False  # block 0 (keys 0-15) is padding only; the sinks (keys 20-23) are in block 1
    p = StepPattern.build(32, 64, 32, 16, 16, 4, 0, key_mask)
    eligible = p.eligible_mask(p.static_mask())[0, 0]
    # query block 0 (32-47) keeps sink block 1 and its own block 2; block 3 is its future
    assert eligible.tolist() == [[False, False, False, False], [False, False, True, False]]
    p = StepPattern.build(16, 64, 48, 16, 16, 0, 0, key_mask)
    assert p.eligible_mask(p.static_mask())[0, 0].tolist() == [[False, True, True, False]]


def test_rows_is_the_pattern_of_a_chunk():
    whole = StepPattern.build(100, 160, 60, 16, 16, 4, 32)
    part = whole.rows(2, 5)
    alone = StepPattern.build(48, 160, 60 + 32, 16, 16, 4, 32)
    assert part.key() == alone.key()
    assert torch.equal(part.static_mask(), alone.static_mask())


@pytest.mark.parametrize(("args", "match"), [
    ((16, 16, 0, 0, 16, 4, 16), "block_size"), ((16, 16, 0, 16, 0, 4, 16), "query_block_size"),
    ((16, 16, 0, 16, 16, -1, 16), "sink_tokens"), ((16, 16, 0, 16, 16, 4, 1.5), "window"),
])
def test_bad_geometry_is_named(args, match):
    with pytest.raises(ValueError, match=match):
        StepPattern.build(*args)


def test_a_session_builds_one_pattern_per_step_for_all_layers(monkeypatch):
    model = tiny_model("llama")  # 2 layers
    method = longattn.get_method("moba", block_size=16, top_k=2, window=16)
    seen, real = [], StepPattern.build

    def counting(*args, **kwargs):
        seen.append(args[:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(StepPattern, "build", staticmethod(counting))
    with torch.no_grad(), longattn.apply(model, method) as session:
        model(torch.randint(0, 100, (1, 50)))
        model.generate(torch.randint(0, 100, (1, 40)), max_new_tokens=3, do_sample=False)
    # One build per forward step (prefill 50, prefill 40, two decode steps), not one per layer.
    assert seen == [(50, 50, 0), (40, 40, 0), (1, 41, 40), (1, 42, 41)]
    assert session.stats.calls == 2 * 4
