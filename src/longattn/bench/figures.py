"""PNG figures of benchmark results and of per-head measurements, drawn on ``matplotlib.figure.Figure`` objects.

Nothing here calls ``matplotlib.use`` or imports pyplot, so a caller's backend (a notebook's) is left as it
was; figures render to files through the Agg canvas that ``Figure.savefig`` picks for PNG. matplotlib is
imported only when a figure is drawn, and its absence is an ImportError that says how to install it.

Report figures (used by :func:`longattn.bench.report.write_report`) return False when there is nothing to
draw: `accuracy_heatmap`, `accuracy_vs_density`, `recall_per_layer`, `nll_by_position`. Head figures return
the path written: `sink_map`, `profile_heatmap`.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from longattn.bench.results import Section, bucket_nll, label_of, ok_cells, recall_curves, unique

DPI = 120
HEAD_DPI = 110
CMAP = "RdYlGn"
FONTS = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9, "figure.titlesize": 13}
MARKERS = "osD^v<>p*hX"
SCORE_TITLES = {"retrieval": "retrieval score", "streaming": "streaming score (sinks + window mass)",
                "hidden_sink_mass": "attention mass on hidden sinks"}

F = TypeVar("F", bound=Callable[..., Any])


def require_matplotlib() -> Any:
    """The ``matplotlib`` module, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("longattn draws its figures with matplotlib: pip install matplotlib") from e
    return matplotlib


def _figure(**kwargs: Any) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _styled(draw: F) -> F:
    """Draw under the report's font sizes (an rc context: the caller's settings are restored after)."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with require_matplotlib().rc_context(FONTS):
            return draw(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _save(fig: Any, path: str | Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


def short_length(n: int) -> str:
    """``4096`` -> ``"4k"``; lengths that are not a multiple of 256 stay in tokens."""
    return f"{n / 1024:g}k" if n >= 1024 and n % 256 == 0 else str(n)


# ---------------------------------------------------------------------------------------------- report figures


@_styled
def accuracy_heatmap(section: Section, path: str | Path) -> bool:
    """Mean score over (length, depth), one panel per label; False (nothing drawn) without depths or scores."""
    cells = [c for c in ok_cells(section.cells) if c.get("depth") is not None and c.get("score") is not None]
    if not cells:
        return False
    labels = unique(label_of(c) for c in cells)
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    width = 1.0 + 0.8 * len(lengths)
    fig = _figure(figsize=(width * len(labels) + 1.5, 1.2 + 0.45 * len(depths)), layout="constrained")
    axes = fig.subplots(1, len(labels), squeeze=False, sharey=True)
    for ax, label in zip(axes[0], labels, strict=True):
        grid = np.full((len(depths), len(lengths)), np.nan)  # (depth, length); NaN where no cell ran
        for (i, j), scores in _grid_scores(cells, label, depths, lengths).items():
            grid[i, j] = sum(scores) / len(scores)
            colour = "white" if not 0.15 <= grid[i, j] <= 0.85 else "black"
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9, color=colour)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=CMAP, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [short_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_title(label)
        ax.set_xlabel("context length (tokens)")
    axes[0][0].set_ylabel("needle depth (0 = start)")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(f"{section.title}: accuracy by length and depth")
    _save(fig, path)
    return True


def _grid_scores(cells: list[dict], label: str, depths: list, lengths: list) -> dict[tuple[int, int], list[float]]:
    scores = defaultdict(list)
    for c in cells:
        if label_of(c) == label:
            scores[(depths.index(c["depth"]), lengths.index(c["length"]))].append(float(c["score"]))
    return scores


@_styled
def accuracy_vs_density(sections: Sequence[Section], path: str | Path) -> bool:
    """Accuracy (with its interval) against density, one panel per task; False when no row has both."""
    panels = [(s.title, [r for r in s.rows if r.accuracy is not None and r.density is not None]) for s in sections]
    panels = [(title, rows) for title, rows in panels if rows]
    if not panels:
        return False
    labels = unique(r.label for _, rows in panels for r in rows)
    fig = _figure(figsize=(5.5 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels, strict=True):
        for i, label in enumerate(labels):
            mine = [r for r in rows if r.label == label]
            if not mine:
                continue
            errors = [[r.accuracy - r.ci_low for r in mine], [r.ci_high - r.accuracy for r in mine]]
            ax.errorbar([r.density for r in mine], [r.accuracy for r in mine], yerr=errors,
                        fmt=MARKERS[i % len(MARKERS)] + "-", color=f"C{i % 10}", label=label, capsize=3, alpha=0.85)
            # One note per point: lengths that land on the same spot would otherwise print over each other.
            at = defaultdict(list)
            for r in mine:
                at[(r.density, r.accuracy)].append(short_length(r.length))
            for xy, names in at.items():
                ax.annotate(",".join(names), xy, xytext=(4, 4), textcoords="offset points", fontsize=8)
        densities = [r.density for r in rows]
        # Sparse methods sit at 0.01–0.2 and dense at 1: on a linear axis they would all crowd the left edge.
        if min(densities) > 0 and max(densities) / min(densities) > 10:
            ax.set_xscale("log")
        else:
            ax.set_xlim(0, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.set(title=title, xlabel="density (share of causal query-key pairs)", ylabel="accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle("Accuracy against attention density (labels: context length)")
    _save(fig, path)
    return True


@_styled
def recall_per_layer(records: Sequence[dict], path: str | Path) -> bool:
    """Per-layer recall (mean solid, p10 dashed) per label, one panel per length; dense (recall 1) is left out."""
    from matplotlib.ticker import MaxNLocator

    curves = recall_curves(records)
    below_one = {label for (label, _), (mean, _) in curves.items() if np.nanmin(mean) < 1 - 1e-6}
    full = {label for label, _ in curves} - below_one
    curves = {k: v for k, v in curves.items() if k[0] not in full}
    if not curves:
        return False
    # Colours follow the order of all labels, as in the other figures, though dense is not drawn here.
    labels = unique(label_of(r) for r in records)
    lengths = sorted({n for _, n in curves})
    fig = _figure(figsize=(5.5 * len(lengths), 4.2), layout="constrained")
    axes = fig.subplots(1, len(lengths), squeeze=False, sharey=True)
    for ax, length in zip(axes[0], lengths, strict=True):
        for i, label in enumerate(labels):
            if (label, length) in curves:
                mean, p10 = curves[(label, length)]
                ax.plot(mean, "-", color=f"C{i % 10}", marker=".", label=label)
                ax.plot(p10, "--", color=f"C{i % 10}")
        ax.set(title=f"length {length}", xlabel="layer", ylim=(0, 1.02))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(title=f"omitted (recall 1): {', '.join(sorted(full))}" if full else None, loc="lower left")
    axes[0][0].set_ylabel("attention recall")
    fig.suptitle("Attention recall per layer (solid: mean, dashed: 10th percentile)")
    _save(fig, path)
    return True


@_styled
def nll_by_position(section: Section, path: str | Path) -> bool:
    """NLL per position bucket, one line per label, one panel per length; False without buckets."""
    buckets = bucket_nll(section.cells)
    if not buckets:
        return False
    labels = unique(label for label, _ in buckets)
    lengths = sorted({n for _, n in buckets})
    fig = _figure(figsize=(5.5 * len(lengths), 4.2), layout="constrained")
    axes = fig.subplots(1, len(lengths), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        for i, label in enumerate(labels):
            spans = sorted(buckets.get((label, length), {}).items())
            if spans:
                ax.plot([(s + e) / 2 for (s, e), _ in spans], [v for _, v in spans], marker=MARKERS[i % len(MARKERS)],
                        color=f"C{i % 10}", label=label)
        ax.set(title=f"length {length}", xlabel="position in context (bucket centre, tokens)",
               ylabel="NLL (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(f"{section.title}: NLL by position")
    _save(fig, path)
    return True


# ------------------------------------------------------------------------------------------------ head figures


def _save_head_figure(fig: Any, path: str | Path) -> Path:
    """Lay out and write a head figure as PNG (parent directories created)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=HEAD_DPI)
    return path


def sink_map(recorder: Any, heads: Sequence[tuple[int, int]], tokens: Sequence[str], path: str | Path,
             top: int = 5) -> Path:
    """Plot, for each ``(layer, head)``, the far attention every prompt token receives (sink ratio: 1 =
    uniform) on a log scale, and label its ``top`` strongest tokens with their text and position.

    Args:
        recorder: a head recorder that has seen the prompt's prefill: its ``ratios`` maps layer -> ``[Hq, Tk]``
            sink ratios (a tensor or array).
        heads: the ``(layer, head)`` pairs to draw, one panel each.
        tokens: the prompt's token texts.
        path: the PNG to write (parent directories created).

    Returns:
        ``path``.

    Raises:
        ValueError: ``heads`` is empty, or names a layer the recorder saw no prefill of.
    """
    if not heads:
        raise ValueError("heads must name at least one (layer, head)")
    missing = sorted({layer for layer, _ in heads if layer not in recorder.ratios})
    if missing:
        raise ValueError(f"the recorder saw no prefill of layer {missing[0]}")
    fig = _figure(figsize=(10, 2.2 * len(heads)))
    axes = fig.subplots(len(heads), 1, squeeze=False)
    for ax, (layer, head) in zip(axes[:, 0], heads):
        ratio = np.maximum(np.asarray(recorder.ratios[layer][head], dtype=np.float64), 1e-3)
        ax.semilogy(ratio, lw=0.7)
        ax.axhline(1.0, color="grey", lw=0.5, ls="--")
        ax.set_ylabel(f"L{layer} H{head}")
        for pos in np.argsort(-ratio, kind="stable")[: min(top, ratio.size)].tolist():
            text = tokens[pos] if pos < len(tokens) else "?"
            ax.annotate(f"{text!r}@{pos}", (pos, float(ratio[pos])), fontsize=7, rotation=20)
    axes[-1, 0].set_xlabel("prompt position (far attention received / uniform share)")
    return _save_head_figure(fig, path)


def profile_heatmap(profile: Any, path: str | Path, score: str = "retrieval") -> Path:
    """Save a layer x head heat map of one score of a head profile as PNG; returns the path.

    Args:
        profile: a ``HeadProfile`` (read through ``scores(score)``, ``num_layers``, ``num_heads`` and
            ``model["name"]``).
        path: the PNG to write (parent directories created).
        score: the score to draw, one the profile's ``scores`` accepts (it raises ValueError otherwise).
    """
    grid = np.asarray(profile.scores(score), dtype=np.float64)
    layers, heads = int(profile.num_layers), int(profile.num_heads)
    fig = _figure(figsize=(1.2 + 0.45 * heads, 1.0 + 0.22 * layers))
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0.0, vmax=max(1e-6, float(grid.max())),
                      interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(0, layers, max(1, layers // 15)))
    ax.set_title(f"{SCORE_TITLES.get(score, score)}\n{profile.model.get('name')}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.08)
    return _save_head_figure(fig, path)
