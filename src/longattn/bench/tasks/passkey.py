"""Passkey retrieval: a 5-digit key hidden at a given depth in repetitive filler (Landmark Attention's test)."""

from __future__ import annotations

import random
import re
from typing import Any

from longattn.bench.tasks import haystack as hs
from longattn.bench.tasks.base import Example

KIND = "generate"
HAYSTACKS = ("repeat",)  # the classic test is defined on its repeated filler only
MAX_NEW_TOKENS = 8
FILLER = hs.REPEAT_SENTENCES
INTRO = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "What is the pass key? The pass key is"


def _needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _haystack(needle: str, n: int, depth: float) -> str:
    # Placed by sentence count, not by the character position the other tasks use: on this uniform filler the
    # two agree within a sentence, and keeping the original placement (and first guess below) keeps the
    # prompts byte-identical to the ones the end-to-end MoBA test was measured on.
    sentences = hs.filler("repeat", 0, n)
    before = round(n * depth)
    return " ".join([*sentences[:before], needle, *sentences[before:]])


def make(tokenizer: Any, length: int, depth: float, seed: int, *, haystack: str = "repeat") -> Example:
    """A passkey prompt of ``length`` tokens (within 1%, or 3 tokens for short prompts) with the needle at
    relative ``depth`` in [0, 1] of the filler.

    The same ``(length, depth, seed)`` gives the same prompt. The prompt is plain text completed by the model
    (no chat template): the question ends with "The pass key is", so the key is the continuation. Only the
    repeated filler of the original test is offered (``haystack="repeat"``).
    """
    hs.check_args(length, depth, haystack, allowed=("repeat",))
    key = f"{random.Random(seed).randint(10000, 99999)}"
    needle = _needle(key)
    fixed = hs.count_tokens(tokenizer, INTRO + needle + " " + QUESTION)
    per_sentence = hs.count_tokens(tokenizer, " ".join(hs.filler("repeat", 0, 50)) + " ") / 50
    n, prompt, tokens = hs.fit_prompt(
        tokenizer, length, lambda n: INTRO + _haystack(needle, n, depth) + " " + QUESTION,
        start=round((length - fixed) / per_sentence), what="passkey prompt",
    )
    meta = {
        "task": "passkey", "length": length, "tokens": tokens, "depth": depth, "seed": seed,
        "haystack": haystack, "needle_positions": [prompt.index(needle)], "needles": [needle],
        "haystack_span": (len(INTRO), len(INTRO) + len(_haystack(needle, n, depth))),
    }
    return Example(prompt=prompt, answer=key, meta=meta)


def score(example: Example, output: str) -> float:
    """1.0 when the first number in ``output`` is the key, else 0.0."""
    found = re.search(r"\d+", output)
    return float(found is not None and found.group(0) == example.answer)
