"""The identity and provenance of a bench cell: its stable key (what resume matches on), the method's config
as JSON, and the hardware and library versions every result line records."""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from longattn.methods.base import Method


def method_config(method: Method) -> dict[str, Any]:
    """The method's dataclass fields (its whole config) as JSON-ready values."""
    return {f.name: _jsonable(getattr(method, f.name)) for f in dataclasses.fields(method)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Method):  # a composed method (duo's selector, act's base): the spec that rebuilds it
        return {"name": value.name, **method_config(value)}
    return repr(value)


def cell_key(task: str, haystack: str, label: str, config: Mapping[str, Any], model_id: str, length: int,
             depth: float | None, seed: int) -> str:
    """Stable identity of one cell: the same arguments always give the same key (resume matches on it)."""
    return json.dumps([task, haystack, label, dict(sorted(config.items())), model_id, length, depth, seed],
                      sort_keys=True)


def finished_keys(path: Path) -> set[str]:
    """Keys of the cells already in ``path`` (errored cells included: delete a line to run it again)."""
    if not path.exists():
        return set()
    keys = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            keys.add(json.loads(line)["key"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number} is not a result line of longattn bench ({err})") from err
    return keys


def hardware() -> dict[str, Any]:
    """Where the numbers come from: device, its name, and the CPU threads torch uses."""
    if torch.cuda.is_available():
        return {"device": "cuda", "name": torch.cuda.get_device_name(), "threads": torch.get_num_threads()}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": "cpu", "name": name, "threads": torch.get_num_threads()}


def versions() -> dict[str, str]:
    """Library versions recorded in every line."""
    from importlib.metadata import version

    import transformers

    return {"longattn": version("longattn"), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
