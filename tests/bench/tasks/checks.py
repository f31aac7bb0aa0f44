"""Measurements shared by the task tests."""

from __future__ import annotations


def n_tokens(tokenizer, text: str) -> int:
    """Token count as the tasks define it."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def relative_depth(example, i: int = 0) -> float:
    """Relative character position of needle ``i`` in the haystack with every needle taken out."""
    start, end = example.meta["haystack_span"]
    needles, positions = example.meta["needles"], example.meta["needle_positions"]
    before = sum(len(n) + 1 for n, p in zip(needles, positions) if p < positions[i])
    filler = end - start - sum(len(n) + 1 for n in needles)
    return (positions[i] - start - before) / filler
