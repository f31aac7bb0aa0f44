"""Passkey retrieval: a 5-digit key hidden at a given depth in repetitive filler (Landmark Attention's test)."""

from __future__ import annotations

import random
import re
from typing import Any

from longattn.bench.tasks.base import Example

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "What is the pass key? The pass key is"


def _needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def make(tokenizer: Any, length: int, depth: float, seed: int) -> Example:
    """A passkey prompt of ``length`` tokens (within 1%) with the needle at relative ``depth`` in [0, 1].

    The same ``(length, depth, seed)`` gives the same prompt. The prompt is plain text completed by the model
    (no chat template): the question ends with "The pass key is", so the key is the continuation.
    """
    if not isinstance(length, int) or length < 64:
        raise ValueError(f"length must be an integer >= 64 tokens, got {length!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
    key = f"{random.Random(seed).randint(10000, 99999)}"
    needle = _needle(key)
    fixed = _count(tokenizer, INTRO + needle + QUESTION)
    per_filler = _count(tokenizer, FILLER * 8) / 8
    n_filler = max(0, round((length - fixed) / per_filler))
    before = round(n_filler * depth)
    prompt = INTRO + FILLER * before + needle + FILLER * (n_filler - before) + QUESTION
    # Tokenisation is not exactly additive at the seams; trim or add fillers until within 1%.
    actual = _count(tokenizer, prompt)
    while abs(actual - length) > 0.01 * length and n_filler > 0:
        n_filler += 1 if actual < length else -1
        before = round(n_filler * depth)
        prompt = INTRO + FILLER * before + needle + FILLER * (n_filler - before) + QUESTION
        actual = _count(tokenizer, prompt)
    meta = {"task": "passkey", "length": length, "tokens": actual, "depth": depth, "seed": seed}
    return Example(prompt=prompt, answer=key, meta=meta)


def score(example: Example, output: str) -> float:
    """1.0 when the first number in ``output`` is the key, else 0.0."""
    found = re.search(r"\d+", output)
    return float(found is not None and found.group(0) == example.answer)
