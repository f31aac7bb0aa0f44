"""SnapKV: what the prompt's last queries vote for is kept, the rest is gone for the rest of the sequence."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.methods import SelectionContext


def _step(m, q, k, memory):
    ctx = SelectionContext(kv_len=k.shape[2], q_offset=k.shape[2] - q.shape[2], layer=0, num_kv_heads=k.shape[1],
                           keys=k, memory=memory)
    return m.select(q, None, ctx)


def _planted(tk=128, d=16):
    torch.manual_seed(0)
    k = torch.randn(1, 1, tk, d) * 0.1
    q = torch.randn(1, 2, tk, d) * 0.1
    k[0, 0, 40, 0] = 6.0  # the token the prompt's last queries look at
    q[0, :, -8:, 0] = 3.0
    return q, k


def test_the_voted_token_survives_the_prompt_and_the_rest_is_evicted():
    q, k = _planted()
    m = longattn.get_method("snapkv", budget_tokens=3, window=8, sink_tokens=2, observe=8, pool=3)
    memory: dict = {}
    prefill = _step(m, q, k, memory)
    assert prefill.dense_heads is not None  # no eviction before the prompt has ended
    k1 = torch.cat([k, torch.randn(1, 1, 1, 16)], dim=2)
    decode = _step(m, q[:, :, -1:], k1, memory)
    kept = decode.indices[0, 0, 0, : decode.counts[0, 0, 0]].tolist()
    assert kept == sorted({0, 1, 39, 40, 41, *range(120, 128), 128})  # sinks, the voted phrase, window, new
    assert memory["evicted_at"] == 128


def test_a_follow_up_prompt_never_gets_evicted_tokens_back():
    q, k = _planted()
    m = longattn.get_method("snapkv", budget_tokens=3, window=8, sink_tokens=2, observe=8, pool=1)
    memory: dict = {}
    _step(m, q, k, memory)
    k1 = torch.cat([k, torch.randn(1, 1, 1, 16)], dim=2)
    _step(m, q[:, :, -1:], k1, memory)
    # A follow-up whose queries look at token 90, which the first prompt's votes dropped.
    k2 = torch.cat([k1, torch.randn(1, 1, 16, 16) * 0.1], dim=2)
    k2[0, 0, 90, 1] = 9.0
    q2 = torch.randn(1, 2, 16, 16) * 0.1
    q2[0, :, :, 1] = 3.0
    follow = _step(m, q2, k2, memory)
    seen = set(follow.indices[0, 0, -1, : follow.counts[0, 0, -1]].tolist())
    assert 90 not in seen and 40 in seen and set(range(128, 145)) <= seen
    k3 = torch.cat([k2, torch.randn(1, 1, 1, 16)], dim=2)
    after = _step(m, q2[:, :, -1:], k3, memory)
    assert 90 not in after.indices.flatten().tolist()


@pytest.mark.parametrize("config, match", [({"pool": 4}, "pool"), ({"block_size": 16}, "block_size"),
                                           ({"budget_tokens": -1}, "budget_tokens"), ({"observe": 0}, "observe")])
def test_bad_config(config, match):
    with pytest.raises(ValueError, match=match):
        longattn.get_method("snapkv", **config)


def test_a_new_sequence_starts_with_an_empty_memory():
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    a, b = (torch.randint(0, 256, (1, 160), generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    m = longattn.get_method("snapkv", budget_tokens=8, window=16)
    with torch.no_grad():
        with longattn.apply(model, m):
            model.generate(a, max_new_tokens=4, do_sample=False)
            after_a = model.generate(b, max_new_tokens=4, do_sample=False)
        with longattn.apply(model, m):
            fresh = model.generate(b, max_new_tokens=4, do_sample=False)
    assert torch.equal(after_a, fresh)


def test_tova_keeps_a_fixed_size_and_drops_what_the_current_query_ignores():
    q, k = _planted()
    m = longattn.get_method("tova", budget_tokens=3, window=4, sink_tokens=2)
    memory: dict = {}
    _step(m, q, k, memory)
    size = 2 + 3 + 4
    for step in range(3):
        k = torch.cat([k, torch.randn(1, 1, 1, 16) * 0.1], dim=2)
        q1 = torch.randn(1, 2, 1, 16) * 0.1
        q1[0, :, 0, 0] = 3.0  # keeps looking at token 40
        sel = _step(m, q1, k, memory)
        assert sel.counts[0, 0, 0] == size + 1  # this step reads the kept set and its new token
        kept = memory["kept"][0, 0].tolist()
        assert len(kept) == size and {0, 1, 40, k.shape[2] - 1} <= set(kept)
