"""RULER's needle-in-a-haystack wording and scoring, shared by the ``niah_*`` tasks (not a task itself).

Needles read "One of the special magic numbers for fluffy-sloth is: 4821937." with word-pair keys and 7-digit
values, as in RULER (https://arxiv.org/abs/2404.06654). Prompts are plain text completed by the model: on the
default SmolLM2-135M-Instruct a question that ends with the answer's lead-in is answered far more reliably
than a chat-templated one.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

from longattn.bench.tasks import haystack as hs
from longattn.bench.tasks.base import Example

INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
# No adjective ends another and no noun starts another, so no key is a substring of a different key.
ADJECTIVES = (
    "fluffy", "brave", "quiet", "shiny", "grumpy", "gentle", "clumsy", "eager", "fancy", "jolly", "lazy",
    "mighty", "nervous", "proud", "silly", "sleepy", "sturdy", "tidy", "vivid", "witty", "zealous", "ancient",
    "bitter", "crispy", "dusty", "frozen", "golden", "hollow", "humble", "icy",
)
NOUNS = (
    "sloth", "otter", "falcon", "badger", "walrus", "lemon", "anchor", "lantern", "pebble", "violin", "comet",
    "meadow", "cactus", "tulip", "kettle", "harbor", "glacier", "pepper", "saddle", "turtle", "orchid",
    "beacon", "dolphin", "marble", "quill", "raven", "spruce", "thimble", "yak", "zebra",
)


def needle(key: str, value: str) -> str:
    """The needle sentence stating ``value`` for ``key``."""
    return f"One of the special magic numbers for {key} is: {value}."


def question(key: str) -> str:
    """The question about one key, ending with the lead-in the value completes."""
    return (
        f"What is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )


def question_all(query: str) -> str:
    """The question asking for every number of ``query`` (one key, or several keys already listed)."""
    return (
        f"What are all the special magic numbers for {query} mentioned in the provided text? "
        f"The special magic numbers for {query} mentioned in the provided text are"
    )


def listing(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b, and c``."""
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


def keys(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct adjective-noun keys such as "fluffy-sloth"."""
    picks = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), n)
    return [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in picks]


def values(rng: random.Random, n: int, digits: int = 7) -> list[str]:
    """``n`` distinct random numbers of ``digits`` digits (no leading zero)."""
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10**digits), n)]


def spread_depths(rng: random.Random, n: int) -> list[float]:
    """``n`` depths drawn uniformly in [0, 1] (where the needles not asked about first go)."""
    return [rng.random() for _ in range(n)]


def numbers_in(output: str) -> list[str]:
    """Every run of digits in ``output``."""
    return re.findall(r"\d+", output)


def share_found(expected: Sequence[str], output: str) -> float:
    """Share of the ``expected`` numbers that appear among the numbers in ``output``."""
    found = set(numbers_in(output))
    return sum(v in found for v in expected) / len(expected)


def make_example(
    tokenizer: Any,
    task: str,
    length: int,
    depth: float,
    seed: int,
    haystack: str,
    needles: Sequence[tuple[float, str]],
    query: str,
    answers: Sequence[str],
    *,
    intro: str = INTRO,
    extra: dict[str, Any] | None = None,
) -> Example:
    """Fit ``intro + haystack-with-needles + "\\n" + query`` to ``length`` tokens and fill ``meta``.

    ``answers`` with one item becomes ``Example.answer``; with several, ``meta["answers"]`` holds them and the
    answer is them joined with ", ".
    """
    fitted = hs.build_prompt(tokenizer, length, haystack, seed, intro, needles, "\n" + query, what=f"{task} prompt")
    meta: dict[str, Any] = {
        "task": task, "length": length, "tokens": fitted.tokens, "depth": depth, "seed": seed,
        "haystack": haystack, "needle_positions": fitted.needle_positions, "needles": [t for _, t in needles],
        "haystack_span": fitted.haystack_span,
    }
    if len(answers) > 1:
        meta["answers"] = list(answers)
    meta.update(extra or {})
    return Example(prompt=fitted.prompt, answer=", ".join(answers), meta=meta)
