"""Method registry: one file per method, registry key = file stem."""

from __future__ import annotations

from dataclasses import fields
from importlib import import_module
from typing import Any

from longattn.methods.base import Method, SelectionContext, as_method
from longattn.methods.topk import TopKMethod
from longattn.methods.dense import Dense
from longattn.methods.moba import MoBA
from longattn.methods.streaming import Streaming

# name -> class name in longattn/methods/<name>.py; imported on first use, so a method's cost (and any
# optional dependency) is paid only by users of that method.
_REGISTRY: dict[str, str] = {
    "dense": "Dense",
    "streaming": "Streaming",
    "moba": "MoBA",
    "quest": "Quest",
    "infllm": "InfLLM",
    "longheads": "LongHeads",
    "dhsa": "DHSA",
    "hip": "HiP",
    "routing": "Routing",
    "flexprefill": "FlexPrefill",
    "retrieval": "Retrieval",
    "duo": "Duo",
    "razor": "Razor",
    "act": "ACT",
}


def list_methods() -> list[str]:
    """Names accepted by :func:`get_method`."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method name {name!r}; known methods: {', '.join(list_methods())}")
    cls = getattr(import_module(f"longattn.methods.{name}"), _REGISTRY[name])
    if cls.name != name:  # the registry key is the file stem and the class's own name
        raise RuntimeError(f"method class {cls.__name__} declares name {cls.name!r} but is registered as {name!r}")
    return cls


def get_method(name: str, /, **config: Any) -> Method:
    """Instantiate method ``name`` with ``config`` (its dataclass fields)."""
    cls = method_class(name)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options are {sorted(names)}")
    return cls(**config)


__all__ = [
    "Dense", "MoBA", "Method", "SelectionContext", "Streaming", "TopKMethod", "as_method", "get_method", "list_methods",
    "method_class",
]
