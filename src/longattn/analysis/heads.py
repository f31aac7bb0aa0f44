"""Head instruments: which heads retrieve, which only stream, and where the attention sinks are.

Three measurements on real activations, all from sampled query rows (work ``[n, Tk]`` per head, never
``[Tq, Tk]``), gathered by :class:`HeadRecorder`, an observer for :func:`longattn.apply`:

- **retrieval score** (Retrieval Head, Wu et al. 2024, https://arxiv.org/abs/2404.15574): while the model
  copies a needle's answer from the prompt, a head scores a hit at a generated token when its highest
  attention falls on that very token inside the needle; hits / answer tokens, averaged over prompts.
- **streaming score** (DuoAttention, RazorAttention): share of a head's attention mass on the initial sink
  tokens plus the local window, averaged over query rows from the second half of each prompt (where most
  keys lie outside the window, so the share can be small).
- **sink map** (ACT, "Unveiling and Harnessing Hidden Attention Sinks", https://arxiv.org/abs/2406.15765):
  tokens that receive at least ``sink_factor`` times the uniform share, initial ones and hidden ones.

:func:`profile_heads` runs needle prompts through the model and returns a :class:`HeadProfile`, a versioned
JSON document that ``duo``, ``razor`` and ``act`` read.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from longattn.analysis.recall import sample_positions
from longattn.core.selection import Selection

SCHEMA_VERSION = 1
CLASSES = ("retrieval", "streaming", "mixed")
SCORES = ("retrieval", "streaming", "hidden_sink_mass")
# Scores of one chunk of sampled rows are [B, Hq, n, Tk]: bounded so a 128k prompt stays near 100 MB.
_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------- tensor functions


def sampled_attention(q: Tensor, k: Tensor, scale: float, rows: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Dense causal softmax of a few query rows over every key.

    Args:
        q: ``[B, Hq, Tq, D]`` post-RoPE queries; row ``i`` sits at absolute position ``Tk - Tq + i``.
        k: ``[B, Hkv, Tk, D]`` post-RoPE keys (``Hq`` a multiple of ``Hkv``; K is never repeated in memory).
        rows: ``[n]`` int64 query rows.
        key_mask: optional ``[B, Tk]`` bool, False on padding keys.

    Returns:
        ``[B, Hq, n, Tk]`` float32 probabilities (zero on future and padding keys).
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if k.dim() != 4 or k.shape[0] != b or k.shape[-1] != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not fit [B, Hq, Tq, D] / [B, Hkv, Tk, D]")
    if rows.dim() != 1 or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= tq)):
        raise ValueError(f"rows must be a 1-D tensor of query rows in [0, {tq})")
    g = hq // hkv
    qs = q[:, :, rows].float().view(b, hkv, g, -1, d)
    scores = torch.einsum("bkgnd,bktd->bkgnt", qs, k.float()).reshape(b, hq, -1, tk) * scale
    pos = (tk - tq + rows).view(1, 1, -1, 1)
    allowed = torch.arange(tk, device=q.device).view(1, 1, 1, -1) <= pos
    if key_mask is not None:
        allowed = allowed & key_mask.view(b, 1, 1, tk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def local_mass(probs: Tensor, positions: Tensor, sink_tokens: int, window: int) -> Tensor:
    """Share of each row's attention on the first ``sink_tokens`` keys plus the ``window`` keys before it.

    Args:
        probs: ``[B, H, n, Tk]`` attention rows; positions: ``[n]`` their absolute positions.

    Returns:
        ``[B, H, n]`` float32 in ``[0, 1]``.
    """
    keys = torch.arange(probs.shape[-1], device=probs.device).view(1, -1)
    pos = positions.view(-1, 1)
    kept = (keys < sink_tokens) | ((keys <= pos) & (keys >= pos - window))  # [n, Tk]
    return (probs * kept).sum(-1)


def far_ratio_sums(probs: Tensor, positions: Tensor, min_distance: int) -> tuple[Tensor, Tensor]:
    """The two sums behind the sink ratio, so chunks of rows can be accumulated.

    Only rows farther than ``min_distance`` from a key count for it: every key near a query gets more than
    the uniform share ``1 / (position + 1)``, which says nothing about sinks.

    Args:
        probs: ``[..., n, Tk]`` causal attention rows; positions: ``[n]`` their absolute positions.

    Returns:
        ``sums [..., Tk]`` (attention x (position + 1), summed over the far rows) and ``rows [Tk]`` int64
        (how many rows are far from each key).
    """
    keys = torch.arange(probs.shape[-1], device=probs.device).view(1, -1)
    far = keys < (positions - min_distance).view(-1, 1)  # [n, Tk]
    sums = (probs * far * (positions.float() + 1).view(-1, 1)).sum(-2)
    return sums, far.sum(0)


def sink_ratio(probs: Tensor, positions: Tensor, min_distance: int = 0) -> Tensor:
    """Mean over the far rows of each key's attention relative to the uniform share ``1 / (position + 1)``.

    ``probs [..., n, Tk]``, ``positions [n]`` -> ``[..., Tk]`` float32: 1.0 is uniform, a sink takes many
    times that; keys no row sees from farther than ``min_distance`` get 0.
    """
    sums, rows = far_ratio_sums(probs, positions, min_distance)
    return sums / rows.clamp(min=1)


def last_row_argmax(q: Tensor, k: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Key position each head attends most from the step's last query: ``[B, Hq]`` int64.

    ``q [B, Hq, Tq, D]``, ``k [B, Hkv, Tk, D]``; the scale does not change an argmax.
    """
    b, hq, _, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scores = torch.einsum("bkgd,bktd->bkgt", q[:, :, -1].float().view(b, hkv, hq // hkv, d), k.float())
    scores = scores.reshape(b, hq, tk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.view(b, 1, tk), float("-inf"))
    return scores.argmax(-1)


# ----------------------------------------------------------------------------------------------- recorder


@dataclass
class HeadRecorder:
    """Observer for :func:`longattn.apply` that gathers every head's measurements over one generation.

    Feed it one prompt: the prefill call (``Tq > 1``) gives the streaming share and the sink ratios of
    ``sampled_queries`` rows from the prompt's second half, and every call (prefill included) the argmax
    key position of its last query, which produced the next generated token. Call :meth:`reset` between
    prompts. Batch size 1 only (one needle per prompt).
    """

    sink_tokens: int = 4
    window: int = 256
    sampled_queries: int = 32
    argmax: list[dict[int, Tensor]] = field(default_factory=list)
    """Per generated token, layer -> ``[Hq]`` argmax key position."""
    streaming: dict[int, Tensor] = field(default_factory=dict)
    """Layer -> ``[Hq]`` mean local mass of the prefill's sampled rows."""
    ratios: dict[int, Tensor] = field(default_factory=dict)
    """Layer -> ``[Hq, Tk]`` sink ratio of every prompt token, from the rows it is farther than ``window`` from
    (0 for a token no sampled row sees from afar)."""
    mass: dict[int, Tensor] = field(default_factory=dict)
    """Layer -> ``[Hq, Tk]`` mean attention of the sampled rows on every prompt token."""
    _calls: dict[int, int] = field(default_factory=dict)

    def __call__(self, layer: int, q: Tensor, k: Tensor, selection: Selection, scale: float,
                 key_mask: Tensor | None = None) -> None:
        if q.shape[0] != 1:
            raise ValueError(f"HeadRecorder measures one prompt at a time (batch 1), got batch {q.shape[0]}")
        step = self._calls.get(layer, 0)
        self._calls[layer] = step + 1
        while len(self.argmax) <= step:
            self.argmax.append({})
        self.argmax[step][layer] = last_row_argmax(q, k, key_mask)[0].cpu()
        tq, tk = q.shape[2], k.shape[2]
        if tq == 1:
            return
        half = tq // 2
        rows = half + sample_positions(tq - half, self.sampled_queries, q.device)
        positions = tk - tq + rows
        local, weighted, mass = [], torch.zeros(q.shape[1], tk), torch.zeros(q.shape[1], tk)
        far_rows = torch.zeros(tk, dtype=torch.long)
        step_rows = max(1, _CHUNK_ELEMENTS // (q.shape[1] * tk))
        for first in range(0, rows.numel(), step_rows):
            part, pos = rows[first : first + step_rows], positions[first : first + step_rows]
            probs = sampled_attention(q, k, scale, part, key_mask)[0]  # [Hq, n, Tk]
            local.append(local_mass(probs, pos, self.sink_tokens, self.window))
            sums, count = far_ratio_sums(probs, pos, self.window)
            weighted += sums.cpu()
            far_rows += count.cpu()
            mass += probs.sum(1).cpu()
        self.streaming[layer] = torch.cat(local, dim=1).mean(1).cpu()
        self.ratios[layer] = weighted / far_rows.clamp(min=1)  # sink_ratio over every chunk's rows
        self.mass[layer] = mass / rows.numel()

    def reset(self) -> None:
        self.argmax, self.streaming, self.ratios, self.mass, self._calls = [], {}, {}, {}, {}


def plot_sink_map(recorder: HeadRecorder, heads: Sequence[tuple[int, int]], tokens: Sequence[str],
                  path: str | Path, top: int = 5) -> Path:
    """Plot, for each ``(layer, head)``, the far attention every prompt token receives (sink ratio: 1 =
    uniform) on a log scale, and label its ``top`` strongest tokens with their text and position.

    ``recorder`` must have seen the prompt's prefill; ``tokens`` are the prompt's token texts. Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not heads:
        raise ValueError("heads must name at least one (layer, head)")
    fig, axes = plt.subplots(len(heads), 1, figsize=(10, 2.2 * len(heads)), squeeze=False)
    for ax, (layer, head) in zip(axes[:, 0], heads):
        if layer not in recorder.ratios:
            raise ValueError(f"the recorder saw no prefill of layer {layer}")
        ratio = recorder.ratios[layer][head].clamp(min=1e-3)
        ax.semilogy(ratio.numpy(), lw=0.7)
        ax.axhline(1.0, color="grey", lw=0.5, ls="--")
        ax.set_ylabel(f"L{layer} H{head}")
        for pos in ratio.topk(min(top, ratio.numel())).indices.tolist():
            text = tokens[pos] if pos < len(tokens) else "?"
            ax.annotate(f"{text!r}@{pos}", (pos, float(ratio[pos])), fontsize=7, rotation=20)
    axes[-1, 0].set_xlabel("prompt position (far attention received / uniform share)")
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG (parent directories created) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def retrieval_hits(argmax: Sequence[dict[int, Tensor]], generated: Sequence[int], prompt_ids: Sequence[int],
                   span: tuple[int, int], num_layers: int, num_heads: int) -> Tensor:
    """Copy-paste hits of every head over one generation (Retrieval Head's rule).

    A generated token ``w`` counts when it occurs in the answer span ``[start, end)`` of the prompt; a head
    hits when its argmax key at that step is a position of the span holding ``w``.

    Args:
        argmax: per generated token, layer -> ``[Hq]`` argmax key position (:attr:`HeadRecorder.argmax`).
        generated: the generated token ids, in order; prompt_ids: the prompt's token ids.
        span: answer token span in the prompt.

    Returns:
        ``[L, Hq]`` float32 hit counts.
    """
    hits = torch.zeros(num_layers, num_heads)
    start, end = span
    answer = list(prompt_ids[start:end])
    for step, token in enumerate(generated[: len(argmax)]):
        if token not in answer:
            continue
        for layer, pos in argmax[step].items():
            inside = (pos >= start) & (pos < end)
            same = torch.tensor([inside[h] and prompt_ids[int(pos[h])] == token for h in range(pos.numel())])
            hits[layer] += same.float()
    return hits


def copy_hits(model: Any, input_ids: Tensor, span: tuple[int, int], recorder: HeadRecorder, max_new_tokens: int,
              eos_token_id: int | None = None) -> tuple[list[int], Tensor]:
    """Generate greedily with dense attention under ``recorder`` and score every head's copying.

    Args:
        input_ids: ``[1, T]`` the prompt; span: ``[start, end)`` token positions of the answer in it.

    Returns:
        The generated token ids and ``[L, Hq]`` hits / answer tokens (the prompt's retrieval scores).
    """
    from longattn.bench.generate import greedy_generate
    from longattn.hf import apply
    from longattn.methods import get_method

    start, end = span
    if not 0 <= start < end <= input_ids.shape[1]:
        raise ValueError(f"span must satisfy 0 <= start < end <= {input_ids.shape[1]}, got {span}")
    ident = model_identity(model)
    recorder.reset()
    with apply(model, get_method("dense"), observer=recorder):
        result = greedy_generate(model, input_ids, max_new_tokens, eos_token_id=eos_token_id)
    generated = result.tokens.tolist()
    hits = retrieval_hits(recorder.argmax, generated, input_ids[0].tolist(), span, ident["num_layers"],
                          ident["num_heads"])
    return generated, hits / (end - start)


# ----------------------------------------------------------------------------------------------- profile


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
        layers, heads = int(self.model.get("num_layers", -1)), int(self.model.get("num_heads", -1))
        for name in ("retrieval", "streaming", "hidden_sink_mass", "initial_sink_mass"):
            grid = getattr(self, name)
            if len(grid) != layers or any(len(row) != heads for row in grid):
                raise ValueError(f"HeadProfile.{name} must be [num_layers={layers}][num_heads={heads}]")
        if not self.classes:
            self.classes = self.classify(
                self.settings.get("retrieval_threshold", 0.1), self.settings.get("streaming_threshold", 0.9)
            )

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
        if name not in (*SCORES, "initial_sink_mass"):
            raise ValueError(f"score must be one of {', '.join(SCORES)}, initial_sink_mass; got {name!r}")
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

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` unless ``model`` (a HF model or its config) has this profile's layout."""
        ident = model_identity(model)
        for key in ("num_layers", "num_heads", "num_kv_heads"):
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
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a HeadProfile is a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{source}: HeadProfile schema_version {version!r} is not supported (this longattn reads version "
                f"{SCHEMA_VERSION}); profile the model again with `longattn heads profile`"
            )
        required = ("model", "settings", "retrieval", "streaming", "hidden_sink_mass", "initial_sink_mass")
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"{source}: HeadProfile is missing field(s) {missing}")
        return cls(**{key: data[key] for key in (*required, "sinks", "classes") if key in data},
                   schema_version=version)

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
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(data, source=str(path))

    def heatmap(self, path: str | Path, score: str = "retrieval") -> Path:
        """Save a layer x head heat map of one score as PNG; returns the path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = self.scores(score).numpy()
        fig, ax = plt.subplots(figsize=(1.2 + 0.45 * self.num_heads, 1.0 + 0.22 * self.num_layers))
        image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0.0, vmax=max(1e-6, float(grid.max())),
                          interpolation="nearest")
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(self.num_heads))
        ax.set_yticks(range(0, self.num_layers, max(1, self.num_layers // 15)))
        title = {"retrieval": "retrieval score", "streaming": "streaming score (sinks + window mass)",
                 "hidden_sink_mass": "attention mass on hidden sinks"}.get(score, score)
        ax.set_title(f"{title}\n{self.model.get('name')}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.08)
        return _save(fig, path)


def as_profile(profile: "HeadProfile | str | Path") -> HeadProfile:
    """A :class:`HeadProfile`, loading it when given a path."""
    if isinstance(profile, HeadProfile):
        return profile
    if isinstance(profile, (str, Path)):
        return HeadProfile.load(profile)
    raise ValueError(f"profile must be a HeadProfile or the path of its JSON file, got {type(profile).__name__}")


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


def encode_needle_prompt(tokenizer: Any, example: Any) -> tuple[Tensor, tuple[int, int]]:
    """Tokenize a one-needle example once: ``input_ids [1, T]`` and the answer's token span ``[start, end)``.

    The answer's characters are found inside the needle (``meta["needle_positions"][0]``,
    ``meta["needles"][0]``); the span comes from the same encoding's offsets (fast tokenizers only).
    """
    needle_at = example.meta["needle_positions"][0]
    start = needle_at + example.meta["needles"][0].index(example.answer)
    end = start + len(example.answer)
    enc = tokenizer(example.prompt, return_offsets_mapping=True, return_tensors="pt")
    if "offset_mapping" not in enc:
        raise ValueError("profiling needs a fast tokenizer (one that returns offset mappings)")
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"][0].tolist()) if b > a and a < end and b > start]
    if not inside:
        raise ValueError(f"no token covers the answer's characters [{start}, {end}) of the prompt")
    return enc["input_ids"], (inside[0], inside[-1] + 1)


def profile_heads(
    model: Any,
    tokenizer: Any,
    *,
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    seeds: Sequence[int] = (0,),
    haystack: str = "natural",
    sink_tokens: int = 4,
    window: int = 256,
    sampled_queries: int = 32,
    sink_factor: float = 10.0,
    retrieval_threshold: float = 0.1,
    streaming_threshold: float = 0.9,
    max_new_tokens: int = 12,
    model_name: str | None = None,
    progress: Any = None,
) -> HeadProfile:
    """Profile every head of ``model`` on ``niah_single`` prompts (dense attention, greedy answers).

    Args:
        lengths, depths, seeds: the prompt grid (one prompt per combination).
        haystack: "natural" (real sentences; copying heads are not distracted by repeated filler) or "repeat".
        sink_tokens, window: what the streaming score counts as local (match the ``duo`` you will run).
        sampled_queries: query rows per prompt for the streaming score and the sink map.
        sink_factor: a token is a sink in a head when it receives ``>= sink_factor`` times the uniform share.
        retrieval_threshold, streaming_threshold: how heads are classified.
        model_name: the name stored in the profile (default: the config's ``_name_or_path``).
        progress: a ``rich.progress.Progress`` to report to (None: silent).

    Returns:
        The model's :class:`HeadProfile`; ``settings["accuracy"]`` is the share of prompts answered right.
    """
    from longattn.bench.tasks import niah_single

    for name, value in (("sink_factor", sink_factor), ("retrieval_threshold", retrieval_threshold),
                        ("streaming_threshold", streaming_threshold)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not lengths or not depths or not seeds:
        raise ValueError("lengths, depths and seeds must each hold at least one value")
    ident = model_identity(model)
    if model_name is not None:
        ident["name"] = model_name
    layers, heads = ident["num_layers"], ident["num_heads"]
    recorder = HeadRecorder(sink_tokens=sink_tokens, window=window, sampled_queries=sampled_queries)
    hits, streaming = torch.zeros(layers, heads), torch.zeros(layers, heads)
    hidden, initial = torch.zeros(layers, heads), torch.zeros(layers, heads)
    sink_text: dict[tuple[int, int], Counter] = {}
    sink_info: dict[tuple[int, int, str], list[float | int]] = {}
    texts: dict[int, str] = {}
    correct, prompts = 0, [(n, d, s) for n in lengths for d in depths for s in seeds]
    task = progress.add_task("profiling heads", total=len(prompts)) if progress is not None else None
    device = next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    for length, depth, seed in prompts:
        example = niah_single.make(tokenizer, length, depth, seed, haystack=haystack)
        ids, span = encode_needle_prompt(tokenizer, example)
        ids = ids.to(device)
        generated, prompt_hits = copy_hits(model, ids, span, recorder, max_new_tokens, eos)
        correct += int(niah_single.score(example, tokenizer.decode(generated, skip_special_tokens=True)))
        prompt_ids = ids[0].tolist()
        hits += prompt_hits
        for layer in range(layers):
            streaming[layer] += recorder.streaming[layer]
            ratio = recorder.ratios[layer]  # [Hq, Tk]
            is_sink = ratio >= sink_factor
            share = recorder.mass[layer]
            initial[layer] += (share[:, :sink_tokens] * is_sink[:, :sink_tokens]).sum(-1)
            hidden[layer] += (share[:, sink_tokens:] * is_sink[:, sink_tokens:]).sum(-1)
            for head in range(heads):
                for pos in is_sink[head, sink_tokens:].nonzero().flatten().tolist():
                    pos += sink_tokens
                    if prompt_ids[pos] not in texts:  # " the" alone is a sink thousands of times
                        texts[prompt_ids[pos]] = tokenizer.decode([prompt_ids[pos]])
                    text = texts[prompt_ids[pos]]
                    sink_text.setdefault((layer, head), Counter())[text] += 1
                    info = sink_info.setdefault((layer, head, text), [0.0, []])
                    info[0] = max(info[0], float(ratio[head, pos]))
                    if len(info[1]) < 5:
                        info[1].append(pos)
        if task is not None:
            progress.advance(task)
    n = len(prompts)
    sinks = []
    for (layer, head), counts in sorted(sink_text.items()):
        tokens = [{"text": text, "count": count, "ratio": round(sink_info[(layer, head, text)][0], 2),
                   "positions": sink_info[(layer, head, text)][1]} for text, count in counts.most_common(5)]
        sinks.append({"layer": layer, "head": head, "tokens": tokens})
    settings = {
        "task": "niah_single", "haystack": haystack, "lengths": list(lengths), "depths": list(depths),
        "seeds": list(seeds), "prompts": n, "sink_tokens": sink_tokens, "window": window,
        "sampled_queries": sampled_queries, "sink_factor": sink_factor, "max_new_tokens": max_new_tokens,
        "retrieval_threshold": retrieval_threshold, "streaming_threshold": streaming_threshold,
        "accuracy": correct / n,
    }

    def grid(t: Tensor) -> list[list[float]]:
        return [[round(float(x), 4) for x in row] for row in t / n]

    return HeadProfile(model=ident, settings=settings, retrieval=grid(hits), streaming=grid(streaming),
                       hidden_sink_mass=grid(hidden), initial_sink_mass=grid(initial), sinks=sinks)
