"""The passkey task on the default model's tokenizer: exact lengths, needle depth, determinism, scoring."""

from __future__ import annotations

import hashlib

import pytest

from longattn.bench.tasks import passkey

from .checks import n_tokens, relative_depth


@pytest.mark.parametrize("length", [512, 1024, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_hits_length_and_depth(tokenizer, length, depth):
    ex = passkey.make(tokenizer, length, depth, seed=3)
    n = n_tokens(tokenizer, ex.prompt)
    assert abs(n - length) <= 0.01 * length and ex.meta["tokens"] == n
    assert ex.prompt.startswith(passkey.INTRO) and ex.prompt.endswith(" " + passkey.QUESTION)
    needle = ex.prompt.index(f"The pass key is {ex.answer}")
    assert ex.meta["needle_positions"] == [needle]
    assert abs(relative_depth(ex) - depth) < 0.02


def test_same_seed_same_prompt_and_different_seeds_differ(tokenizer):
    assert passkey.make(tokenizer, 600, 0.3, 1) == passkey.make(tokenizer, 600, 0.3, 1)
    assert passkey.make(tokenizer, 600, 0.3, 1).answer != passkey.make(tokenizer, 600, 0.3, 2).answer


def test_score_reads_the_first_number():
    ex = passkey.Example(prompt="", answer="12345")
    assert passkey.score(ex, " 12345. Remember") == 1.0
    assert passkey.score(ex, " the pass key 12345") == 1.0
    assert passkey.score(ex, " 1234") == 0.0
    assert passkey.score(ex, " no number") == 0.0


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="length"):
        passkey.make(tokenizer, 10, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        passkey.make(tokenizer, 1000, 1.5, 0)
    with pytest.raises(ValueError, match="haystack.*'repeat'"):
        passkey.make(tokenizer, 1000, 0.5, 0, haystack="natural")


def test_prompt_is_the_one_the_end_to_end_moba_test_was_measured_on(tokenizer):
    # tests/test_default_model.py expects MoBA to find this exact prompt's key (found in ~3/4 prompts), so a
    # change of filler, placement or length search must be a deliberate one.
    ex = passkey.make(tokenizer, 1024, 0.5, 0)
    assert ex.meta["tokens"] == 1018 and ex.meta["needle_positions"] == [1889]
    assert hashlib.sha256(ex.prompt.encode()).hexdigest().startswith("a915422c6156fed7")
