"""RULER's multi-query needle in a haystack: 4 needles with different keys, one question asking for all four
values. The first key's needle sits at ``depth``, the others at depths drawn uniformly in [0, 1] from the
seed."""

from __future__ import annotations

import random
from typing import Any

from longattn.bench.tasks import haystack as hs
from longattn.bench.tasks import niah
from longattn.bench.tasks.base import Example

KIND = "generate"
MAX_NEW_TOKENS = 48  # four 7-digit numbers and their separators take ~37 tokens
QUERIES = 4


def make(tokenizer: Any, length: int, depth: float, seed: int, *, haystack: str = "repeat") -> Example:
    """A prompt of ``length`` tokens (within 1%, or 3 tokens for short prompts) with 4 keyed needles, the
    first at relative character position ``depth`` in [0, 1] of the ``haystack``.

    The question lists the keys in needle order; ``meta["answers"]`` holds their values in that order and
    ``meta["keys"]`` the keys.
    """
    hs.check_args(length, depth, haystack)
    rng = random.Random(seed)
    keys = niah.keys(rng, QUERIES)
    vals = niah.values(rng, QUERIES)
    depths = [depth, *niah.spread_depths(rng, QUERIES - 1)]
    needles = [(d, niah.needle(k, v)) for d, k, v in zip(depths, keys, vals)]
    return niah.make_example(
        tokenizer, "niah_multiquery", length, depth, seed, haystack, needles,
        niah.question_all(niah.listing(keys)), vals, extra={"keys": keys},
    )


def score(example: Example, output: str) -> float:
    """Share of the expected values among the numbers in ``output`` (partial credit)."""
    return niah.share_found(example.meta["answers"], output)
