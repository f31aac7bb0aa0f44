"""The passkey task on the default model's tokenizer: exact lengths, needle depth, determinism, scoring."""

from __future__ import annotations

import pytest

from longattn.bench.tasks import passkey


@pytest.mark.parametrize("length", [512, 1024, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_hits_length_and_depth(default_model, length, depth):
    _, tok = default_model
    ex = passkey.make(tok, length, depth, seed=3)
    n = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
    assert abs(n - length) <= 0.01 * length and ex.meta["tokens"] == n
    needle = ex.prompt.index(f"The pass key is {ex.answer}")
    filler_start = len(passkey.INTRO)
    filler_end = len(ex.prompt) - len(passkey.QUESTION)
    rel = (needle - filler_start) / (filler_end - filler_start - len(passkey._needle(ex.answer)))
    assert abs(rel - depth) < 0.02


def test_same_seed_same_prompt_and_different_seeds_differ(default_model):
    _, tok = default_model
    assert passkey.make(tok, 600, 0.3, 1) == passkey.make(tok, 600, 0.3, 1)
    assert passkey.make(tok, 600, 0.3, 1).answer != passkey.make(tok, 600, 0.3, 2).answer


def test_score_reads_the_first_number():
    ex = passkey.Example(prompt="", answer="12345")
    assert passkey.score(ex, " 12345. Remember") == 1.0
    assert passkey.score(ex, " the pass key 12345") == 1.0
    assert passkey.score(ex, " 1234") == 0.0
    assert passkey.score(ex, " no number") == 0.0


def test_bad_arguments(default_model):
    _, tok = default_model
    with pytest.raises(ValueError, match="length"):
        passkey.make(tok, 10, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        passkey.make(tok, 1000, 1.5, 0)
