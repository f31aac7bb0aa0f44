"""Argument checks shared by the core types and the methods: each error names the argument."""

from __future__ import annotations


def check_int(name: str, value: object, low: int, power_of_two: bool = False) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) ``>= low``, and a power of two if asked."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if power_of_two and value & (value - 1):
        raise ValueError(f"{name} must be a power of two (16, 32, 64, ...), got {value}")


def check_fraction(name: str, value: object, low_open: bool) -> None:
    """Raise ValueError unless ``value`` is a real number in ``(0, 1]`` (``low_open``) or ``[0, 1]``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (value > 0.0 if low_open else value >= 0.0) and value <= 1.0:  # NaN fails both
            return
    raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
