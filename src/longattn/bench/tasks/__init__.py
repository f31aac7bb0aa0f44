"""Benchmark tasks: pure functions ``make(tokenizer, length, depth, seed) -> Example`` plus a scorer."""

from longattn.bench.tasks.base import Example
from longattn.bench.tasks import passkey

TASKS = {"passkey": passkey}

__all__ = ["Example", "TASKS", "passkey"]
