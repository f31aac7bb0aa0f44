"""HeadProfile: per-head scores of one model (retrieval, streaming, sinks), a versioned JSON document.

``duo``, ``razor`` and ``act`` read it; :func:`longattn.bench.profiling.profile_heads` writes it. It lives in
``core`` because methods depend on it and it depends on nothing of ours: it is a schema with its checks. Every
field is validated on construction (loaded or built), and an error names the field and the value allowed,
because a profile with a NaN or an out-of-range score would otherwise load and then make ``duo`` pick no head.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SCHEMA_VERSION = 1
CLASSES = ("retrieval", "streaming", "mixed")
SCORES = ("retrieval", "streaming", "hidden_sink_mass")
GRIDS = (*SCORES, "initial_sink_mass")
_LAYOUT = ("num_layers", "num_heads", "num_kv_heads")


def model_identity(model: Any) -> dict[str, Any]:
    """Layout of a HF model (or config): name, type, layers, query / KV heads, head dim."""
    config = getattr(model, "config", model)
    heads = int(config.num_attention_heads)
    return {
        "name": str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "")),
        "model_type": str(getattr(config, "model_type", "")),
        "num_layers": int(config.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_model_field(model: Any) -> tuple[int, int]:
    if not isinstance(model, dict):
        raise ValueError(f"HeadProfile.model must be an object with {', '.join(_LAYOUT)}, got {type(model).__name__}")
    for key in _LAYOUT:
        if key not in model:
            raise ValueError(f"HeadProfile.model is missing {key!r} (it needs {', '.join(_LAYOUT)})")
        if not _is_int(model[key]) or model[key] < 1:
            raise ValueError(f"HeadProfile.model.{key} must be an int >= 1, got {model[key]!r}")
    if model["num_heads"] % model["num_kv_heads"]:
        raise ValueError(f"HeadProfile.model.num_heads ({model['num_heads']}) must be a multiple of num_kv_heads "
                         f"({model['num_kv_heads']})")
    return model["num_layers"], model["num_heads"]


def _check_grid(name: str, grid: Any, layers: int, heads: int, allowed: tuple[str, ...] | None = None) -> None:
    """``grid`` must be ``[layers][heads]`` of finite numbers in [0, 1] (or, with ``allowed``, of those strings)."""
    shape = f"[num_layers={layers}][num_heads={heads}]"
    if not isinstance(grid, list) or len(grid) != layers or any(not isinstance(r, list) or len(r) != heads for r in grid):
        raise ValueError(f"HeadProfile.{name} must be {shape}")
    for layer, row in enumerate(grid):
        for head, value in enumerate(row):
            if allowed is not None:
                if value not in allowed:
                    raise ValueError(f"HeadProfile.{name}[{layer}][{head}] must be one of {', '.join(allowed)}, "
                                     f"got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0.0 <= value <= 1.0:
                raise ValueError(f"HeadProfile.{name}[{layer}][{head}] must be a finite number in [0, 1], got {value!r}")


def _check_sinks(sinks: Any, layers: int, heads: int) -> None:
    if not isinstance(sinks, list):
        raise ValueError(f"HeadProfile.sinks must be a list, got {type(sinks).__name__}")
    for i, entry in enumerate(sinks):
        if not isinstance(entry, dict) or not isinstance(entry.get("tokens"), list):
            raise ValueError(f"HeadProfile.sinks[{i}] must be an object with layer, head and a tokens list")
        for key, limit in (("layer", layers), ("head", heads)):
            if not _is_int(entry.get(key)) or not 0 <= entry[key] < limit:
                raise ValueError(f"HeadProfile.sinks[{i}].{key} must be an int in [0, {limit}), got {entry.get(key)!r}")


@dataclass
class HeadProfile:
    """Per-head scores of one model, saved as versioned JSON.

    Attributes:
        model: identity of the model profiled (``name``, ``model_type``, ``num_layers``, ``num_heads``,
            ``num_kv_heads``, ``head_dim``); loading checks a model against it.
        settings: how the scores were measured (task, lengths, depths, seeds, thresholds, window...).
        retrieval, streaming, hidden_sink_mass, initial_sink_mass: ``[L][Hq]`` scores in ``[0, 1]``.
        sinks: per head with hidden sinks, ``{"layer", "head", "tokens": [{"text", "count", "ratio",
            "positions"}]}`` (the most frequent hidden-sink tokens over the prompts).
        classes: ``[L][Hq]`` "retrieval" / "streaming" / "mixed".
        schema_version: :data:`SCHEMA_VERSION` of the code that wrote it.
    """

    model: dict[str, Any]
    settings: dict[str, Any]
    retrieval: list[list[float]]
    streaming: list[list[float]]
    hidden_sink_mass: list[list[float]]
    initial_sink_mass: list[list[float]]
    sinks: list[dict[str, Any]] = field(default_factory=list)
    classes: list[list[str]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        layers, heads = _check_model_field(self.model)
        if not isinstance(self.settings, dict):
            raise ValueError(f"HeadProfile.settings must be an object, got {type(self.settings).__name__}")
        for name in GRIDS:
            _check_grid(name, getattr(self, name), layers, heads)
        _check_sinks(self.sinks, layers, heads)
        if self.classes:
            _check_grid("classes", self.classes, layers, heads, CLASSES)
        else:
            thresholds = {}
            for key, default in (("retrieval_threshold", 0.1), ("streaming_threshold", 0.9)):
                value = self.settings.get(key, default)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"HeadProfile.settings.{key} must be a finite number, got {value!r}")
                thresholds[key] = value
            self.classes = self.classify(**thresholds)

    def __repr__(self) -> str:  # a profile's scores fill pages; name the model instead
        return (f"HeadProfile({self.model.get('name')!r}, {self.num_layers}x{self.num_heads} heads, "
                f"{self.retrieval_share():.1%} retrieval)")

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.model["num_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.model["num_kv_heads"])

    def scores(self, name: str = "retrieval") -> Tensor:
        """One score as a ``[L, Hq]`` float32 tensor; ``name`` in :data:`SCORES` or "initial_sink_mass"."""
        if name not in GRIDS:
            raise ValueError(f"score must be one of {', '.join(GRIDS)}; got {name!r}")
        return torch.tensor(getattr(self, name), dtype=torch.float32)

    def kv_head_scores(self, name: str = "retrieval") -> Tensor:
        """Max of a score over each KV head's query heads: ``[L, Hkv]`` (a KV head's cache serves them all)."""
        return self.scores(name).view(self.num_layers, self.num_kv_heads, -1).amax(-1)

    def classify(self, retrieval_threshold: float = 0.1, streaming_threshold: float = 0.9) -> list[list[str]]:
        """Retrieval where ``retrieval >= retrieval_threshold``; else streaming where ``streaming >=
        streaming_threshold``; else mixed."""
        out = []
        for r_row, s_row in zip(self.retrieval, self.streaming):
            out.append(["retrieval" if r >= retrieval_threshold else "streaming" if s >= streaming_threshold
                        else "mixed" for r, s in zip(r_row, s_row)])
        return out

    def retrieval_share(self, threshold: float = 0.1) -> float:
        """Share of query heads whose retrieval score exceeds ``threshold``."""
        return float((self.scores() > threshold).float().mean()) if self.num_layers else 0.0

    def retrieval_heads(self, granularity: str = "kv_head", threshold: float | None = None,
                        share: float | None = None) -> dict[int, set[int]]:
        """The heads that retrieve, layer -> heads: by ``threshold`` (retrieval score >= it) or by ``share``
        (the top share of heads), exactly one of them. ``granularity`` "kv_head" scores a KV head by the
        max over its query heads; "query_head" chooses query heads."""
        if granularity not in ("kv_head", "query_head"):
            raise ValueError(f"granularity must be 'kv_head' or 'query_head', got {granularity!r}")
        scores = self.kv_head_scores() if granularity == "kv_head" else self.scores()  # [L, heads]
        # A hybrid model's sliding-window layers are not profiled (settings["profiled_layers"] lists the
        # full-attention ones): never chosen, and a share counts the profiled layers' heads only.
        profiled = self.settings.get("profiled_layers")
        eligible = torch.ones_like(scores, dtype=torch.bool)
        if isinstance(profiled, list) and profiled:
            eligible = torch.zeros_like(eligible)
            eligible[[int(i) for i in profiled if 0 <= int(i) < scores.shape[0]]] = True
        if (threshold is None) == (share is None):
            raise ValueError("with a profile, set exactly one of threshold (a retrieval score in [0, 1]) or "
                             "retrieval_share (a share of heads in (0, 1])")
        for name, value in (("threshold", threshold), ("retrieval_share", share)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if threshold is not None:
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
            chosen = (scores >= threshold) & eligible
        else:
            if not 0.0 < share <= 1.0:  # type: ignore[operator]
                raise ValueError(f"retrieval_share must lie in (0, 1], got {share}")
            count = math.ceil(share * int(eligible.sum()))  # type: ignore[operator]
            # Most heads never copy (score 0): among equal retrieval scores, prefer the heads that attend
            # farthest (lowest streaming score: least mass on sinks + window), then by position.
            streaming = self.scores("streaming")
            if granularity == "kv_head":
                streaming = streaming.view(self.num_layers, self.num_kv_heads, -1).amin(-1)
            ranked = scores.masked_fill(~eligible, -math.inf).flatten()
            by_reach = torch.argsort(streaming.flatten(), stable=True)
            order = by_reach[torch.argsort(ranked[by_reach], descending=True, stable=True)][:count]
            chosen = torch.zeros(scores.numel(), dtype=torch.bool)
            chosen[order] = True
            chosen = chosen.view_as(scores)
        out: dict[int, set[int]] = {}
        for layer, head in chosen.nonzero().tolist():
            out.setdefault(layer, set()).add(head)
        return out

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` unless ``model`` (a HF model or its config) has this profile's layout."""
        ident = model_identity(model)
        for key in _LAYOUT:
            if int(ident[key]) != int(self.model[key]):
                raise ValueError(
                    f"this HeadProfile was made for {self.model.get('name')!r} with {self.num_layers} layers x "
                    f"{self.num_heads} heads ({self.num_kv_heads} KV heads), but the model has "
                    f"{ident['num_layers']} x {ident['num_heads']} ({ident['num_kv_heads']} KV heads); profile "
                    f"this model with `longattn heads profile`"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "model": self.model, "settings": self.settings,
            "retrieval": self.retrieval, "streaming": self.streaming, "hidden_sink_mass": self.hidden_sink_mass,
            "initial_sink_mass": self.initial_sink_mass, "classes": self.classes, "sinks": self.sinks,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> "HeadProfile":
        """A profile from its JSON object; anything malformed raises ``ValueError`` naming ``source`` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a HeadProfile is a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{source}: HeadProfile schema_version {version!r} is not supported (this longattn reads version "
                f"{SCHEMA_VERSION}); profile the model again with `longattn heads profile`"
            )
        required = ("model", "settings", *GRIDS)
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"{source}: HeadProfile is missing field(s) {missing}")
        unknown = sorted(set(data) - {*required, "sinks", "classes", "schema_version"})
        if unknown:
            raise ValueError(f"{source}: HeadProfile has unknown field(s) {unknown}")
        try:
            return cls(**{key: data[key] for key in (*required, "sinks", "classes") if key in data},
                       schema_version=version)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON (parent directories created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HeadProfile":
        """Read a profile written by :meth:`save`; a file that is not one raises ``ValueError``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no HeadProfile at {str(path)!r}; make one with `longattn heads profile`")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(data, source=str(path))


def as_profile(profile: "HeadProfile | str | Path") -> HeadProfile:
    """A :class:`HeadProfile`, loading it when given a path."""
    if isinstance(profile, HeadProfile):
        return profile
    if isinstance(profile, (str, Path)):
        return HeadProfile.load(profile)
    raise ValueError(f"profile must be a HeadProfile or the path of its JSON file, got {type(profile).__name__}")
