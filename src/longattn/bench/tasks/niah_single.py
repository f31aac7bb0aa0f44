"""RULER's single needle in a haystack: one magic number hidden at ``depth``, asked for by its key."""

from __future__ import annotations

import random
from typing import Any

from longattn.bench.tasks import haystack as hs
from longattn.bench.tasks import niah
from longattn.bench.tasks.base import Example

KIND = "generate"
MAX_NEW_TOKENS = 16


def make(tokenizer: Any, length: int, depth: float, seed: int, *, haystack: str = "repeat") -> Example:
    """A prompt of ``length`` tokens (within 1%, or 3 tokens for short prompts) with one needle at relative
    character position ``depth`` in [0, 1] of the ``haystack`` ("repeat" or "natural").

    The same arguments give the same prompt; the seed picks the key, the value and where natural text starts.
    """
    hs.check_args(length, depth, haystack)
    rng = random.Random(seed)
    key, value = niah.keys(rng, 1)[0], niah.values(rng, 1)[0]
    return niah.make_example(
        tokenizer, "niah_single", length, depth, seed, haystack, [(depth, niah.needle(key, value))],
        niah.question(key), [value],
    )


def score(example: Example, output: str) -> float:
    """1.0 when the expected value is among the numbers in ``output``, else 0.0."""
    return float(example.answer in niah.numbers_in(output))
