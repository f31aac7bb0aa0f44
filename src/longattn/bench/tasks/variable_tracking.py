"""RULER's variable tracking: a chain "VAR A = 12345." "VAR B = VAR A." ... of 4 hops (5 variables) and a
distractor chain with another value; the question asks for every variable holding the first chain's value.

The first statement sits at ``depth`` and the other four at sorted depths drawn uniformly in [``depth``, 1]
from the seed, so the chain reads in order; the distractor chain's statements sit at sorted depths drawn
uniformly in [0, 1].
"""

from __future__ import annotations

import random
import re
import string
from typing import Any

from longattn.bench.tasks import haystack as hs
from longattn.bench.tasks import niah
from longattn.bench.tasks.base import Example

KIND = "generate"
MAX_NEW_TOKENS = 40  # five 5-letter names and their separators take ~25 tokens
HOPS = 4
INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


def _chain(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]


def question(value: str, count: int) -> str:
    """RULER's question, ending with the lead-in the variable names complete."""
    return (
        f"Question: Find all variables that are assigned the value {value} in the text above. Answer: According "
        f"to the chain(s) of variable assignment in the text above, {count} variables are assigned the value "
        f"{value}, they are:"
    )


def make(tokenizer: Any, length: int, depth: float, seed: int, *, haystack: str = "repeat") -> Example:
    """A prompt of ``length`` tokens (within 1%, or 3 tokens for short prompts) with the asked chain starting
    at relative character position ``depth`` in [0, 1] of the ``haystack``.

    ``meta["answers"]`` lists the chain's variable names in order; ``meta["needles"]`` holds the asked chain's
    statements, then the distractor's, matching ``meta["needle_positions"]``.
    """
    hs.check_args(length, depth, haystack)
    rng = random.Random(seed)
    names = _names(rng, 2 * (HOPS + 1))
    value, other = niah.values(rng, 2, digits=5)
    asked, distractor = names[: HOPS + 1], names[HOPS + 1 :]
    depths = [depth, *sorted(depth + (1.0 - depth) * rng.random() for _ in range(HOPS))]
    distractor_depths = sorted(rng.random() for _ in range(HOPS + 1))
    needles = list(zip(depths, _chain(asked, value))) + list(zip(distractor_depths, _chain(distractor, other)))
    return niah.make_example(
        tokenizer, "variable_tracking", length, depth, seed, haystack, needles, question(value, len(asked)),
        asked, intro=INTRO,
    )


def score(example: Example, output: str) -> float:
    """Share of the expected variable names found as whole words in ``output`` (case-insensitive, as RULER)."""
    names = example.meta["answers"]
    return sum(re.search(rf"\b{n}\b", output, re.IGNORECASE) is not None for n in names) / len(names)
