"""RULER's multi-value needle in a haystack: one key stated with 4 different values. The first value sits at
``depth``, the other three at depths drawn uniformly in [0, 1] from the seed; the question asks for all four."""

from __future__ import annotations

import random
from typing import Any

from longattn.bench.tasks import haystack as hs
from longattn.bench.tasks import niah
from longattn.bench.tasks.base import Example

KIND = "generate"
MAX_NEW_TOKENS = 48  # four 7-digit numbers and their separators take ~37 tokens
VALUES = 4


def make(tokenizer: Any, length: int, depth: float, seed: int, *, haystack: str = "repeat") -> Example:
    """A prompt of ``length`` tokens (within 1%, or 3 tokens for short prompts) with 4 needles for one key,
    the first at relative character position ``depth`` in [0, 1] of the ``haystack``.

    ``meta["answers"]`` lists the values in the order of ``meta["needle_positions"]``.
    """
    hs.check_args(length, depth, haystack)
    rng = random.Random(seed)
    key = niah.keys(rng, 1)[0]
    vals = niah.values(rng, VALUES)
    depths = [depth, *niah.spread_depths(rng, VALUES - 1)]
    needles = [(d, niah.needle(key, v)) for d, v in zip(depths, vals)]
    return niah.make_example(
        tokenizer, "niah_multivalue", length, depth, seed, haystack, needles, niah.question_all(key), vals,
    )


def score(example: Example, output: str) -> float:
    """Share of the expected values among the numbers in ``output`` (partial credit)."""
    return niah.share_found(example.meta["answers"], output)
