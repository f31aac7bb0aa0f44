"""RULER's multi-key needle in a haystack: the asked needle at ``depth`` plus 3 distractor needles with other
keys and other values, placed at depths drawn uniformly in [0, 1] from the seed."""

from __future__ import annotations

import random
from typing import Any

from longattn.bench.tasks import haystack as hs
from longattn.bench.tasks import niah
from longattn.bench.tasks.base import Example

KIND = "generate"
MAX_NEW_TOKENS = 16
DISTRACTORS = 3


def make(tokenizer: Any, length: int, depth: float, seed: int, *, haystack: str = "repeat") -> Example:
    """A prompt of ``length`` tokens (within 1%, or 3 tokens for short prompts) whose first needle, the one
    asked about, sits at relative character position ``depth`` in [0, 1] of the ``haystack``.

    ``meta["needles"]`` lists the needle sentences, the asked one first, matching ``meta["needle_positions"]``.
    """
    hs.check_args(length, depth, haystack)
    rng = random.Random(seed)
    keys = niah.keys(rng, 1 + DISTRACTORS)
    vals = niah.values(rng, 1 + DISTRACTORS)
    depths = [depth, *niah.spread_depths(rng, DISTRACTORS)]
    needles = [(d, niah.needle(k, v)) for d, k, v in zip(depths, keys, vals)]
    return niah.make_example(
        tokenizer, "niah_multikey", length, depth, seed, haystack, needles, niah.question(keys[0]), [vals[0]],
    )


def score(example: Example, output: str) -> float:
    """1.0 when the asked key's value is among the numbers in ``output``, else 0.0 (a distractor's value
    scores nothing)."""
    return float(example.answer in niah.numbers_in(output))
