"""Passkey retrieval: a 5-digit key hidden at a given depth in repetitive filler (Landmark Attention's test)."""

from __future__ import annotations

import random
import re
from typing import Any

from longattn.bench.tasks.base import Example

# Filler is cycled one sentence at a time: a sentence is ~5 tokens, fine enough to land within 1% of any
# length >= 500 tokens.
FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ", "There and back again. ")
INTRO = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "What is the pass key? The pass key is"


def _needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _filler(start: int, n: int) -> str:
    return "".join(FILLER[i % len(FILLER)] for i in range(start, start + n))


def _build(needle: str, n: int, depth: float) -> str:
    before = round(n * depth)
    return INTRO + _filler(0, before) + needle + _filler(before, n - before) + QUESTION


def make(tokenizer: Any, length: int, depth: float, seed: int) -> Example:
    """A passkey prompt of ``length`` tokens (within 1%, or 3 tokens for short prompts) with the needle at
    relative ``depth`` in [0, 1] of the filler.

    The same ``(length, depth, seed)`` gives the same prompt. The prompt is plain text completed by the model
    (no chat template): the question ends with "The pass key is", so the key is the continuation.
    """
    if not isinstance(length, int) or length < 128:
        raise ValueError(f"length must be an integer >= 128 tokens, got {length!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
    key = f"{random.Random(seed).randint(10000, 99999)}"
    needle = _needle(key)
    fixed = _count(tokenizer, INTRO + needle + QUESTION)
    per_sentence = _count(tokenizer, _filler(0, 50)) / 50
    n = max(0, round((length - fixed) / per_sentence))
    tolerance = max(0.01 * length, 3)
    best: tuple[float, int, str] | None = None
    # Tokenisation is not additive at the seams: correct the sentence count a few times, keep the closest.
    for _ in range(8):
        prompt = _build(needle, n, depth)
        actual = _count(tokenizer, prompt)
        if best is None or abs(actual - length) < best[0]:
            best = (abs(actual - length), actual, prompt)
        if abs(actual - length) <= tolerance:
            break
        n = max(0, n + round((length - actual) / per_sentence) or (1 if actual < length else -1))
    assert best is not None
    if best[0] > tolerance:
        raise ValueError(f"could not build a passkey prompt of {length} tokens with this tokenizer (closest {best[1]})")
    meta = {"task": "passkey", "length": length, "tokens": best[1], "depth": depth, "seed": seed}
    return Example(prompt=best[2], answer=key, meta=meta)


def score(example: Example, output: str) -> float:
    """1.0 when the first number in ``output`` is the key, else 0.0."""
    found = re.search(r"\d+", output)
    return float(found is not None and found.group(0) == example.answer)
