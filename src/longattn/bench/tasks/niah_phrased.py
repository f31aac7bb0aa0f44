"""A held-out needle task: natural text, one fact stated in one of four phrasings and asked in its own form.

Nothing here uses the RULER wording the other ``niah_*`` tasks (and the library's tuning) share: the seed picks
the phrasing (an access code, a favourite number, a train ticket, an archive box), its subject and a 6-digit
value, so a method tuned to "special magic numbers" gets no help. Each question ends with the lead-in the
value completes. The calibration of dense attention on both embedded models is in docs/results/quality.md.
"""

from __future__ import annotations

import random
from typing import Any

from longattn.bench.tasks import haystack as hs
from longattn.bench.tasks import niah
from longattn.bench.tasks.base import Example

KIND = "generate"
HAYSTACKS = ("natural",)
MAX_NEW_TOKENS = 12
INTRO = "Read the following text carefully. A question about one detail in it follows the text.\n"

# (needle, question ending with the answer's lead-in); {s} is the subject, {v} the value.
PHRASINGS = (
    ("The access code for the {s} storage room is {v}.",
     "What is the access code for the {s} storage room? The access code for the {s} storage room is"),
    ("{s}'s favourite number, she once said, is {v}.",
     "According to the text, what is {s}'s favourite number? {s}'s favourite number is"),
    ("Remember this: the ticket for the {s} train carries the number {v}.",
     "Which number does the ticket for the {s} train carry? The ticket for the {s} train carries the number"),
    ("In the archive, the box labelled {s} was filed under number {v}.",
     "Under which number was the box labelled {s} filed in the archive? It was filed under number"),
)
SUBJECTS = (
    ("north", "east", "blue", "cellar", "harbour", "garden", "copper", "attic"),
    ("Maria", "Priya", "Elena", "Amara", "Sofia", "Hannah", "Yuki", "Leila"),
    ("midnight", "silver", "coastal", "mountain", "express", "red", "morning", "valley"),
    ("Orion", "Willow", "Ember", "Juniper", "Atlas", "Marigold", "Falcon", "Cobalt"),
)


def make(tokenizer: Any, length: int, depth: float, seed: int, *, haystack: str = "natural") -> Example:
    """A prompt of ``length`` tokens (within 1%, or 3 tokens for short prompts) with the fact at relative
    character position ``depth`` in [0, 1] of a natural-text haystack; ``seed % 4`` picks the phrasing and the
    seed the subject, the value and where the text starts. The same arguments give the same prompt."""
    hs.check_args(length, depth, haystack, allowed=HAYSTACKS)
    rng = random.Random(seed)
    kind = seed % len(PHRASINGS)
    needle, question = PHRASINGS[kind]
    subject = rng.choice(SUBJECTS[kind])
    value = niah.values(rng, 1, digits=6)[0]
    fact = needle.format(s=subject, v=value)
    return niah.make_example(
        tokenizer, "niah_phrased", length, depth, seed, haystack, [(depth, fact)], question.format(s=subject),
        [value], intro=INTRO, extra={"phrasing": kind},
    )


def score(example: Example, output: str) -> float:
    """1.0 when the expected value is among the numbers in ``output``, else 0.0."""
    return float(example.answer in niah.numbers_in(output))
