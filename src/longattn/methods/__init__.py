"""Method registry: one file per method, registry key = file stem (found, not listed)."""

from __future__ import annotations

import pkgutil
from dataclasses import fields
from importlib import import_module
from typing import Any

from longattn.methods.base import Method, SelectionContext
from longattn.methods.topk import TopKMethod
from longattn.methods.dense import Dense
from longattn.methods.moba import MoBA
from longattn.methods.streaming import Streaming

# Modules of this package that hold contracts, not methods. Every other module is one method, registered
# under its file stem: adding a method is adding its file. Modules are imported on first use, so a method's
# cost (and any optional dependency) is paid only by its users.
_CONTRACTS = ("base", "topk")


def list_methods() -> list[str]:
    """Names accepted by :func:`get_method`: the method files of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _CONTRACTS and not m.ispkg)


def method_class(name: str) -> type[Method]:
    """The class of method ``name``: the Method subclass in ``longattn/methods/<name>.py`` whose ``name`` it is."""
    if not isinstance(name, str) or name not in list_methods():
        raise ValueError(f"unknown method name {name!r}; known methods: {', '.join(list_methods())}")
    module = import_module(f"longattn.methods.{name}")
    found = [c for c in vars(module).values()
             if isinstance(c, type) and issubclass(c, Method) and c.__module__ == module.__name__ and c.name == name]
    if len(found) != 1:  # the file stem and the class's own name must agree
        raise RuntimeError(f"longattn/methods/{name}.py must define one Method subclass with name = {name!r}, "
                           f"found {[c.__name__ for c in found]}")
    return found[0]


def get_method(name: str, /, **config: Any) -> Method:
    """Instantiate method ``name`` with ``config`` (its dataclass fields)."""
    cls = method_class(name)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options are {sorted(names)}")
    return cls(**config)


def as_method(spec: "Method | str | dict[str, Any]", field: str) -> Method:
    """A Method from ``spec``: an instance as is, a registered name with its defaults, or a JSON-style
    ``{"name": ..., **options}`` (what the CLI's ``--set`` can express). ``field`` names the option in errors."""
    if isinstance(spec, Method):
        return spec
    if isinstance(spec, str):
        return get_method(spec)
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        options = dict(spec)
        return get_method(options.pop("name"), **options)
    raise ValueError(f"{field} must be a Method (longattn.get_method(...)), a method name, or "
                     f'{{"name": ..., **options}}; got {spec!r}')


__all__ = [
    "Dense", "MoBA", "Method", "SelectionContext", "Streaming", "TopKMethod", "as_method", "get_method", "list_methods",
    "method_class",
]
