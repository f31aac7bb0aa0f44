"""Language-modelling loss on long natural text: the runner scores the negative log-likelihood of the last
``meta["eval_tokens"]`` tokens given everything before them (and per-position buckets over the whole text)."""

from __future__ import annotations

from typing import Any

from longattn.bench.tasks import haystack as hs
from longattn.bench.tasks.base import Example

KIND = "nll"
MAX_NEW_TOKENS = 0
MAX_EVAL_TOKENS = 512


def make(tokenizer: Any, length: int, depth: float, seed: int, *, haystack: str = "natural") -> Example:
    """``length`` tokens (within 1%, or 3 tokens for short texts) of the ``haystack`` text as the prompt, with
    an empty answer and ``meta["eval_tokens"] = min(512, length // 4)``.

    ``depth`` is validated like the other tasks' but unused: there is no needle. The seed picks where the
    natural text starts; "repeat" gives a trivially predictable control.
    """
    hs.check_args(length, depth, haystack)
    _, prompt, tokens = hs.fit_prompt(
        tokenizer, length, lambda n: " ".join(hs.filler(haystack, seed, n)), what="perplexity text"
    )
    meta = {
        "task": "perplexity", "length": length, "tokens": tokens, "depth": depth, "seed": seed,
        "haystack": haystack, "needle_positions": [], "eval_tokens": min(MAX_EVAL_TOKENS, length // 4),
    }
    return Example(prompt=prompt, answer="", meta=meta)


def score(example: Example, output: str) -> float:
    """Not used: this task is scored by the NLL of its last ``meta["eval_tokens"]`` tokens."""
    raise NotImplementedError("perplexity is scored by the NLL of its last eval_tokens tokens, not by generated text")
