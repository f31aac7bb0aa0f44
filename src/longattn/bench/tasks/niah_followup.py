"""A two-turn needle in a haystack: two keyed needles, the first question about key A (at ``depth``), then a
follow-up about key B in the same conversation, answered from the KV cache the first turn left.

B's needle sits at a depth drawn from the seed, uniformly over [0, 1] minus the window within 0.2 of
``depth``, so the two needles are never neighbours.
"""

from __future__ import annotations

import random
from typing import Any

from longattn.bench.tasks import haystack as hs
from longattn.bench.tasks import niah
from longattn.bench.tasks.base import Example

KIND = "followup"
MAX_NEW_TOKENS = 16  # per turn
MIN_GAP = 0.2


def _other_depth(rng: random.Random, depth: float) -> float:
    # Map a uniform draw over the allowed length onto [0, depth - gap] + [depth + gap, 1].
    below = max(0.0, depth - MIN_GAP)
    above = max(0.0, 1.0 - (depth + MIN_GAP))
    u = rng.random() * (below + above)
    return u if u < below else depth + MIN_GAP + (u - below)


def make(tokenizer: Any, length: int, depth: float, seed: int, *, haystack: str = "repeat") -> Example:
    """A prompt of ``length`` tokens (within 1%, or 3 tokens for short prompts; the follow-up text is not
    counted) asking for key A's value, A's needle at relative character position ``depth`` in [0, 1].

    ``meta["followup"]`` is ``{"prompt": text, "answer": value_B}``: the runner appends ``text`` after the
    model's first answer and generates again.
    """
    hs.check_args(length, depth, haystack)
    rng = random.Random(seed)
    key_a, key_b = niah.keys(rng, 2)
    value_a, value_b = niah.values(rng, 2)
    needles = [(depth, niah.needle(key_a, value_a)), (_other_depth(rng, depth), niah.needle(key_b, value_b))]
    followup = {"prompt": "\n\n" + niah.question(key_b), "answer": value_b}
    return niah.make_example(
        tokenizer, "niah_followup", length, depth, seed, haystack, needles, niah.question(key_a), [value_a],
        extra={"followup": followup},
    )


def score(example: Example, output: str) -> float:
    """First turn: 1.0 when A's value is among the numbers in ``output``, else 0.0."""
    return float(example.answer in niah.numbers_in(output))


def score_followup(example: Example, output: str) -> float:
    """Second turn: 1.0 when B's value is among the numbers in ``output``, else 0.0."""
    return float(example.meta["followup"]["answer"] in niah.numbers_in(output))
