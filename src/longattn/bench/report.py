"""Turn benchmark results (one JSON object per line) into a markdown summary and PNG figures.

``write_report("results.jsonl", "report/")`` writes ``report/report.md``: one table per task (accuracy with a 95%
interval, density, recall, speed, memory, errors), the dense baseline each method is judged against, and the
figures it links — accuracy heat maps over length × depth, accuracy against density, attention recall per layer,
and NLL per position bucket for the perplexity task. matplotlib is imported only when a report is drawn.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_KEYS = ("task", "method", "length", "seed")
DENSE = "dense"
MIB = 2**20
DPI = 120
CMAP = "RdYlGn"
FONTS = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9, "figure.titlesize": 13}
MARKERS = "osD^v<>p*hX"
LEGEND = (
    "Accuracy is the mean score over depths and seeds with a 95% interval (Wilson for 0/1 scores), n non-error "
    "cells. Density is the share of causal query-key pairs computed in prefill; recall is the share of dense "
    "attention mass the selection keeps (mean / 10th percentile). Speed-up is dense prefill time / method prefill "
    "time at the same task and length. Peak memory is the largest over the cells (model weights included); added "
    "memory is the most a cell grew above what was resident when it began. Errored cells are excluded "
    "from every mean."
)


@dataclass(frozen=True)
class Row:
    """One (task, label, length) group of cells, pooled over depths and seeds.

    Means are over non-error cells that carry the value; a field is None when no cell does.

    Attributes:
        task: benchmark task name.
        label: display name of method and config (the record's ``label``, else its ``method``).
        length: requested prompt length in tokens.
        n: non-error cells.
        errors: cells that raised.
        accuracy: mean score (None for the perplexity task).
        ci_low: lower end of the 95% interval of the accuracy (see `interval`).
        ci_high: upper end of that interval.
        density: share of causal query-key pairs computed in prefill.
        recall_mean: attention recall of the selection, mean.
        recall_p10: attention recall, 10th percentile.
        prefill_s: seconds for the prompt's forward pass.
        decode_ms_per_token: decode milliseconds per decoded token, pooled over cells.
        peak_mem_mib: largest peak memory of any cell, MiB.
        speedup: dense prefill time at the same task and length / this row's prefill time.
        first_accuracy: first-turn accuracy (niah_followup only).
        nll: mean negative log-likelihood per token (perplexity only).
        haystack: filler kind where the task has one; different haystacks are never pooled.
        added_mem_mib: largest memory any cell added on top of what was resident when it began (the model's
            weights are in the peak, not in this), MiB.
    """

    task: str
    label: str
    length: int
    n: int
    errors: int
    accuracy: float | None
    ci_low: float | None
    ci_high: float | None
    density: float | None
    recall_mean: float | None
    recall_p10: float | None
    prefill_s: float | None
    decode_ms_per_token: float | None
    peak_mem_mib: float | None
    speedup: float | None
    first_accuracy: float | None
    nll: float | None
    haystack: str | None = None
    added_mem_mib: float | None = None


def load_results(path: str | Path) -> list[dict]:
    """Read a results file of one JSON object per line; blank lines are skipped.

    Raises:
        ValueError: a line is not a JSON object or lacks a required key (the message names file and line),
            or the file holds no results.
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                records.append(_parse_line(line, f"{path}, line {lineno}"))
    if not records:
        raise ValueError(f"{path}: no results in the file (run `longattn bench` first)")
    return records


def _parse_line(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        # A runner killed mid-write leaves a truncated last line; saying where lets the user delete just it.
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix or delete the line") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED_KEYS if record.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {', '.join(missing)}")
    return record


def interval(scores: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """Mean of ``scores`` and its confidence interval ``(mean, low, high)``, inside [0, 1].

    All-0/1 scores get the Wilson score interval; other scores the normal approximation mean ± z·sd/√n.

    Raises:
        ValueError: ``scores`` is empty.
    """
    n = len(scores)
    if n == 0:
        raise ValueError("interval needs at least one score")
    mean = sum(scores) / n
    if all(s in (0, 1) for s in scores):
        # Wilson, not mean ± z·sd: at 0/n or n/n the normal interval collapses to a point, claiming certainty.
        denom = 1 + z * z / n
        centre = (mean + z * z / (2 * n)) / denom
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / denom
    else:
        centre = mean
        half = z * statistics.stdev(scores) / math.sqrt(n) if n > 1 else 0.0
    # Rounding can put a Wilson bound a hair past the mean at 0/n or n/n; the interval always holds the mean.
    return mean, max(0.0, min(mean, centre - half)), min(1.0, max(mean, centre + half))


def summarize(records: Sequence[dict]) -> list[Row]:
    """Group cells by (task, haystack, label, length) and average each group.

    Rows are sorted by task, then label in order of first appearance, then length.
    """
    order: dict[str, int] = {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        order.setdefault(_label(r), len(order))
        groups[(r["task"], r.get("haystack"), _label(r), r["length"])].append(r)
    dense = _dense_prefill(records)
    keys = sorted(groups, key=lambda k: (k[0], k[1] or "", order[k[2]], k[3]))
    return [_row(k, groups[k], dense.get((k[0], k[1], k[3]))) for k in keys]


def _row(key: tuple, cells: list[dict], dense_prefill: float | None) -> Row:
    task, haystack, label, length = key
    ok = _ok(cells)
    scores = [float(c["score"]) for c in ok if c.get("score") is not None]
    accuracy, low, high = interval(scores) if scores else (None, None, None)
    recalls = [c["recall"] for c in ok if c.get("recall")]
    prefill = _mean(c.get("prefill_s") for c in ok)
    peaks = [c["peak_mem_bytes"] for c in ok if c.get("peak_mem_bytes") is not None]
    added = [c["mem_delta_bytes"] for c in ok if c.get("mem_delta_bytes") is not None]
    return Row(
        task=task, label=label, length=length, n=len(ok), errors=len(cells) - len(ok),
        accuracy=accuracy, ci_low=low, ci_high=high,
        density=_mean(c.get("density") for c in ok),
        recall_mean=_mean(r.get("mean") for r in recalls), recall_p10=_mean(r.get("p10") for r in recalls),
        prefill_s=prefill, decode_ms_per_token=_decode_ms(ok),
        peak_mem_mib=max(peaks) / MIB if peaks else None,
        speedup=dense_prefill / prefill if dense_prefill and prefill else None,
        first_accuracy=_mean((c.get("first") or {}).get("score") for c in ok),
        nll=_mean((c.get("nll") or {}).get("mean") for c in ok),
        haystack=haystack,
        added_mem_mib=max(added) / MIB if added else None,
    )


def _dense_prefill(records: Sequence[dict]) -> dict[tuple, float]:
    """Mean dense prefill seconds per (task, haystack, length)."""
    times = defaultdict(list)
    for r in _baseline(_ok(records)):
        if r.get("prefill_s") is not None:
            times[(r["task"], r.get("haystack"), r["length"])].append(r["prefill_s"])
    return {k: sum(v) / len(v) for k, v in times.items()}


def _baseline(cells: Iterable[dict]) -> list[dict]:
    dense = [c for c in cells if c["method"] == DENSE]
    # Dense through the block-sparse operator (use_sdpa=False) is a correctness check; speed-ups are against SDPA.
    sdpa = [c for c in dense if (c.get("config") or {}).get("use_sdpa", True)]
    return sdpa or dense


def _decode_ms(cells: list[dict]) -> float | None:
    timed = [c for c in cells if c.get("decode_s") is not None and (c.get("decode_tokens") or 0) > 0]
    if not timed:
        return None
    # Pooled, not a mean of ratios: a cell that stopped after one token would otherwise weigh as much as a full one.
    return 1000 * sum(c["decode_s"] for c in timed) / sum(c["decode_tokens"] for c in timed)


def _label(record: dict) -> str:
    return record.get("label") or record["method"]


def _ok(cells: Iterable[dict]) -> list[dict]:
    return [c for c in cells if c.get("error") is None]


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _ordered(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class _Section:
    """One task (and haystack) of the report: its rows, its cells and where its figures go."""

    task: str
    haystack: str | None
    rows: list[Row]
    cells: list[dict]

    @property
    def title(self) -> str:
        return self.task if self.haystack is None else f"{self.task} ({self.haystack} haystack)"

    @property
    def slug(self) -> str:
        name = self.task if self.haystack is None else f"{self.task}_{self.haystack}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)

    @property
    def perplexity(self) -> bool:
        return self.task == "perplexity" or any(c.get("nll") for c in self.cells)


def _sections(records: Sequence[dict], rows: list[Row]) -> list[_Section]:
    keys = _ordered((r.task, r.haystack) for r in rows)
    return [
        _Section(task, hay, [r for r in rows if (r.task, r.haystack) == (task, hay)],
                 [c for c in records if (c["task"], c.get("haystack")) == (task, hay)])
        for task, hay in keys
    ]


def write_report(results: str | Path | list[dict], out_dir: str | Path) -> Path:
    """Write ``report.md`` and its PNG figures into ``out_dir`` (created if needed).

    Args:
        results: a results JSONL path, or records already loaded.
        out_dir: folder for ``report.md`` and the figures, which it links relatively.

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: there are no results, or the file is malformed (see `load_results`).
        ImportError: matplotlib is not installed.
    """
    source = Path(results) if isinstance(results, (str, Path)) else None
    records = load_results(source) if source else list(results)
    if not records:
        raise ValueError("no results to report")
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    sections = _sections(records, rows)
    with plt.rc_context(FONTS):
        lines = _header(records, source)
        for section in sections:
            lines += _section_markdown(plt, section, out)
        lines += _overview_figures(plt, records, sections, out)
    lines += _errors_markdown(records)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("longattn report draws its figures with matplotlib: pip install matplotlib") from e
    # Agg renders straight to files: benchmark machines have no display.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------------- markdown


def _header(records: Sequence[dict], source: Path | None) -> list[str]:
    errors = len(records) - len(_ok(records))
    origin = f" from `{source.name}`" if source else ""
    lines = ["# Benchmark report", "", f"{len(records)} cells{origin}, {errors} errored.", ""]
    lines.append(f"- Model: {', '.join(_ordered(str(r['model']) for r in records if r.get('model'))) or 'unknown'}")
    for name in ("hardware", "versions"):
        seen = _ordered(json.dumps(r[name], sort_keys=True) for r in records if r.get(name))
        described = "; ".join(", ".join(f"{k} {v}" for k, v in json.loads(s).items()) for s in seen)
        lines.append(f"- {name.capitalize()}: {described or 'unknown'}")
    times = sorted(str(r["time"]) for r in records if r.get("time"))
    if times:
        lines.append(f"- Run: {times[0]}" + (f" to {times[-1]}" if times[-1] != times[0] else ""))
    return lines + ["", LEGEND, ""]


def _section_markdown(plt: Any, section: _Section, out: Path) -> list[str]:
    lines = [f"## {section.title}", ""] + _main_table(section) + ["", _baseline_line(section), ""]
    if section.perplexity:
        lines += _nll_tables(section)
        name = f"perplexity_{section.slug}.png"
        if _perplexity_figure(plt, section, out / name):
            lines += [f"![NLL by position, {section.title}]({name})", ""]
    name = f"heatmap_{section.slug}.png"
    if _heatmap(plt, section, out / name):
        lines += [f"![accuracy by length and depth, {section.title}]({name})", ""]
    return lines


def _main_table(section: _Section) -> list[str]:
    followup = any(r.first_accuracy is not None for r in section.rows)
    quality = "NLL (n)" if section.perplexity else "accuracy [95% CI] (n)"
    header = ["method", "length", quality] + (["first turn"] if followup else []) + [
        "density", "recall mean / p10", "prefill s", "speed-up vs dense", "decode ms/token",
        f"peak MiB ({'/'.join(_ordered(str(c.get('mem_kind')) for c in section.cells)) or '?'})", "added MiB",
        "errors"]
    body = []
    for r in section.rows:
        score = f"{_fmt(r.nll, 3)} ({r.n})" if section.perplexity else _accuracy(r)
        recall = "—" if r.recall_mean is None else f"{_fmt(r.recall_mean, 3)} / {_fmt(r.recall_p10, 3)}"
        speedup = "—" if r.speedup is None else f"{r.speedup:.2f}×"
        body.append([r.label, str(r.length), score] + ([_fmt(r.first_accuracy, 2)] if followup else []) + [
            _fmt(r.density, 3), recall, _fmt(r.prefill_s, 2), speedup, _fmt(r.decode_ms_per_token, 1),
            _fmt(r.peak_mem_mib, 0), _fmt(r.added_mem_mib, 0), str(r.errors)])
    return _table(header, body)


def _accuracy(r: Row) -> str:
    if r.accuracy is None:
        return f"— ({r.n})"
    return f"{r.accuracy:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] ({r.n})"


def _baseline_line(section: _Section) -> str:
    labels = {_label(c) for c in _baseline(section.cells)}
    dense = [r for r in section.rows if r.label in labels]
    if not dense:
        return ("No dense cells for this task: whether the model can answer it at these lengths at all is unknown, "
                "so low scores may not be the method's fault.")
    what, key = ("NLL", "nll") if section.perplexity else ("accuracy", "accuracy")
    parts = [f"{_fmt(getattr(r, key), 3 if section.perplexity else 2)} at {r.length}" for r in dense]
    return f"Dense baseline {what}: {', '.join(parts)}."


def _nll_tables(section: _Section) -> list[str]:
    labels = _ordered(r.label for r in section.rows)
    lengths = sorted({r.length for r in section.rows})
    nll = {(r.label, r.length): r.nll for r in section.rows}
    lines = ["Mean NLL per token (nats):", ""]
    lines += _table(["method"] + [str(n) for n in lengths], [
        [label] + [_fmt(nll.get((label, n)), 3) for n in lengths] for label in labels])
    buckets = _bucket_nll(section.cells)
    for length in lengths:
        spans = sorted({span for (_, n), b in buckets.items() if n == length for span in b})
        if not spans:
            continue
        lines += ["", f"Mean NLL by position at length {length}:", ""]
        lines += _table(["method"] + [f"{s}–{e}" for s, e in spans], [
            [label] + [_fmt(buckets.get((label, length), {}).get(span), 3) for span in spans]
            for label in labels if (label, length) in buckets])
    return lines + [""]


def _bucket_nll(cells: Iterable[dict]) -> dict[tuple[str, int], dict[tuple[int, int], float]]:
    """Mean NLL of each position bucket, per (label, length), over non-error cells."""
    values: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in _ok(cells):
        for b in (c.get("nll") or {}).get("buckets") or []:
            if b.get("nll") is not None:
                values[(_label(c), c["length"])][(b["start"], b["end"])].append(b["nll"])
    return {k: {span: sum(v) / len(v) for span, v in spans.items()} for k, spans in values.items()}


def _errors_markdown(records: Sequence[dict]) -> list[str]:
    failed = [r for r in records if r.get("error") is not None]
    if not failed:
        return []
    body = [[_label(r), r["task"], str(r["length"]), str(r.get("depth")), str(r["seed"]), str(r["error"])]
            for r in failed]
    return ["## Errors", ""] + _table(["method", "task", "length", "depth", "seed", "error"], body)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        # A "|" or newline inside an error message would otherwise break the table.
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(row) for row in body]


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _short_length(n: int) -> str:
    return f"{n / 1024:g}k" if n >= 1024 and n % 256 == 0 else str(n)


# ----------------------------------------------------------------------------------------------------- figures


def _save(plt: Any, fig: Any, path: Path) -> None:
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)


def _overview_figures(plt: Any, records: Sequence[dict], sections: list[_Section], out: Path) -> list[str]:
    lines = []
    if _accuracy_density(plt, [s for s in sections if not s.perplexity], out / "accuracy_vs_density.png"):
        lines += ["## Accuracy against density", "", "![accuracy against density](accuracy_vs_density.png)", ""]
    if _recall_figure(plt, records, out / "recall_per_layer.png"):
        lines += ["## Attention recall per layer", "",
                  "Solid: mean recall; dashed: 10th percentile; averaged over cells.", "",
                  "![attention recall per layer](recall_per_layer.png)", ""]
    return lines


def _heatmap(plt: Any, section: _Section, path: Path) -> bool:
    """Mean score over (length, depth), one panel per label; False (nothing drawn) without depths or scores."""
    cells = [c for c in _ok(section.cells) if c.get("depth") is not None and c.get("score") is not None]
    if not cells:
        return False
    labels = _ordered(_label(c) for c in cells)
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    width = 1.0 + 0.8 * len(lengths)
    fig, axes = plt.subplots(1, len(labels), figsize=(width * len(labels) + 1.5, 1.2 + 0.45 * len(depths)),
                             squeeze=False, layout="constrained", sharey=True)
    for ax, label in zip(axes[0], labels, strict=True):
        grid = np.full((len(depths), len(lengths)), np.nan)  # (depth, length); NaN where no cell ran
        for (i, j), scores in _grid_scores(cells, label, depths, lengths).items():
            grid[i, j] = sum(scores) / len(scores)
            colour = "white" if not 0.15 <= grid[i, j] <= 0.85 else "black"
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9, color=colour)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=CMAP, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [_short_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_title(label)
        ax.set_xlabel("context length (tokens)")
    axes[0][0].set_ylabel("needle depth (0 = start)")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(f"{section.title}: accuracy by length and depth")
    _save(plt, fig, path)
    return True


def _grid_scores(cells: list[dict], label: str, depths: list, lengths: list) -> dict[tuple[int, int], list[float]]:
    scores = defaultdict(list)
    for c in cells:
        if _label(c) == label:
            scores[(depths.index(c["depth"]), lengths.index(c["length"]))].append(float(c["score"]))
    return scores


def _accuracy_density(plt: Any, sections: list[_Section], path: Path) -> bool:
    """Accuracy (with its interval) against density, one panel per task; False when no row has both."""
    panels = [(s.title, [r for r in s.rows if r.accuracy is not None and r.density is not None]) for s in sections]
    panels = [(title, rows) for title, rows in panels if rows]
    if not panels:
        return False
    labels = _ordered(r.label for _, rows in panels for r in rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False, layout="constrained")
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
                at[(r.density, r.accuracy)].append(_short_length(r.length))
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
    _save(plt, fig, path)
    return True


def _recall_figure(plt: Any, records: Sequence[dict], path: Path) -> bool:
    """Per-layer recall (mean solid, p10 dashed) per label, one panel per length; dense (recall 1) is left out."""
    curves = _recall_curves(records)
    below_one = {label for (label, _), (mean, _) in curves.items() if np.nanmin(mean) < 1 - 1e-6}
    full = {label for label, _ in curves} - below_one
    curves = {k: v for k, v in curves.items() if k[0] not in full}
    if not curves:
        return False
    # Colours follow the order of all labels, as in the other figures, though dense is not drawn here.
    labels = _ordered(_label(r) for r in records)
    lengths = sorted({n for _, n in curves})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False,
                             layout="constrained", sharey=True)
    for ax, length in zip(axes[0], lengths, strict=True):
        for i, label in enumerate(labels):
            if (label, length) in curves:
                mean, p10 = curves[(label, length)]
                ax.plot(mean, "-", color=f"C{i % 10}", marker=".", label=label)
                ax.plot(p10, "--", color=f"C{i % 10}")
        ax.set(title=f"length {length}", xlabel="layer", ylim=(0, 1.02))
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(title=f"omitted (recall 1): {', '.join(sorted(full))}" if full else None, loc="lower left")
    axes[0][0].set_ylabel("attention recall")
    fig.suptitle("Attention recall per layer (solid: mean, dashed: 10th percentile)")
    _save(plt, fig, path)
    return True


def _recall_curves(records: Sequence[dict]) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Per (label, length): per-layer mean and p10 recall averaged over non-error cells."""
    per_layer = defaultdict(lambda: ([], []))
    for c in _ok(records):
        recall = c.get("recall") or {}
        if recall.get("per_layer_mean"):
            means, p10s = per_layer[(_label(c), c["length"])]
            means.append(recall["per_layer_mean"])
            p10s.append(recall.get("per_layer_p10") or [math.nan] * len(recall["per_layer_mean"]))
    return {k: (_nanmean_rows(m), _nanmean_rows(p)) for k, (m, p) in per_layer.items()}


def _nanmean_rows(rows: list[list[float]]) -> np.ndarray:
    # Cells from different models may have different layer counts: pad with NaN and average what exists.
    grid = np.full((len(rows), max(len(r) for r in rows)), np.nan)
    for i, r in enumerate(rows):
        grid[i, : len(r)] = [math.nan if v is None else v for v in r]
    counts = np.sum(~np.isnan(grid), axis=0)
    return np.where(counts > 0, np.nansum(grid, axis=0) / np.maximum(counts, 1), np.nan)


def _perplexity_figure(plt: Any, section: _Section, path: Path) -> bool:
    """NLL per position bucket, one line per label, one panel per length; False without buckets."""
    buckets = _bucket_nll(section.cells)
    if not buckets:
        return False
    labels = _ordered(label for label, _ in buckets)
    lengths = sorted({n for _, n in buckets})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False, layout="constrained")
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
    _save(plt, fig, path)
    return True
