"""Method registry: one file per method, registry key = file stem."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from longattn.methods.base import Method, SelectionContext, TopKMethod
from longattn.methods.dense import Dense
from longattn.methods.moba import MoBA
from longattn.methods.streaming import Streaming

_REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (Dense, Streaming, MoBA)}


def list_methods() -> list[str]:
    """Names accepted by :func:`get_method`."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method name {name!r}; known methods: {', '.join(list_methods())}")
    return _REGISTRY[name]


def get_method(name: str, /, **config: Any) -> Method:
    """Instantiate method ``name`` with ``config`` (its dataclass fields)."""
    cls = method_class(name)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options are {sorted(names)}")
    return cls(**config)


__all__ = ["Dense", "MoBA", "Method", "SelectionContext", "Streaming", "TopKMethod", "get_method", "list_methods", "method_class"]
