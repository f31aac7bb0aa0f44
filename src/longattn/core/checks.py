"""Argument checks shared by the core types and the methods: each error names the argument."""

from __future__ import annotations


def check_int(name: str, value: object, low: int, power_of_two: bool = False) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) ``>= low``, and a power of two if asked."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if power_of_two and value & (value - 1):
        raise ValueError(f"{name} must be a power of two (16, 32, 64, ...), got {value}")
