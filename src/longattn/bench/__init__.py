"""Benchmark tasks and the generation loop used to run them."""

from longattn.bench.generate import GenerationResult, greedy_generate
from longattn.bench.tasks import TASKS, Example

__all__ = ["Example", "GenerationResult", "TASKS", "greedy_generate"]
