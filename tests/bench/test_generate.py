"""Greedy generation with chunked prefill."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.bench import greedy_generate
from tests.conftest import tiny_model


@pytest.mark.parametrize("method", [None, "moba"])
def test_chunked_prefill_generates_what_one_shot_does(method):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(1))
    runs = []
    # Segments that end on query-block boundaries (16 here) pool the same queries as one-shot prefill.
    for chunk in (None, 64, 128):
        m = longattn.get_method("moba", block_size=16, top_k=2, window=16) if method else longattn.get_method("dense")
        with longattn.apply(model, m):
            runs.append(greedy_generate(model, ids, 6, prefill_chunk=chunk))
    for r in runs[1:]:
        assert torch.equal(r.tokens, runs[0].tokens)
        assert r.cache.get_seq_length() == runs[0].cache.get_seq_length() == 305


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_prefill_chunk_raises(bad):
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int or None"):
        greedy_generate(tiny_model("llama"), torch.zeros(1, 4, dtype=torch.long), 1, prefill_chunk=bad)


@pytest.mark.parametrize("cached", [False, True])
def test_an_empty_prompt_raises_naming_the_argument(cached):
    model = tiny_model("llama")
    cache = greedy_generate(model, torch.zeros(1, 4, dtype=torch.long), 1).cache if cached else None
    with pytest.raises(ValueError, match="input_ids must hold at least one token"):
        greedy_generate(model, torch.zeros(1, 0, dtype=torch.long), 4, past_key_values=cache)
