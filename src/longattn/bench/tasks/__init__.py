"""Benchmark tasks, one module each, registered by name in ``TASKS``.

Every task module provides ``KIND`` ("generate", "followup" or "nll"), ``MAX_NEW_TOKENS``,
``make(tokenizer, length, depth, seed, *, haystack="repeat") -> Example`` and ``score(example, output)``
in [0, 1]; ``niah_followup`` adds ``score_followup``. Shared machinery lives in ``haystack`` (filler, needle
insertion, length fitting) and ``niah`` (RULER's wording); neither is a task.
"""

from longattn.bench.tasks import (
    niah_followup,
    niah_multikey,
    niah_multiquery,
    niah_multivalue,
    niah_phrased,
    niah_single,
    passkey,
    perplexity,
    variable_tracking,
)
from longattn.bench.tasks.base import Example

TASKS = {
    "passkey": passkey,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "niah_followup": niah_followup,
    "niah_phrased": niah_phrased,
    "variable_tracking": variable_tracking,
    "perplexity": perplexity,
}

__all__ = ["Example", "TASKS", *TASKS]
