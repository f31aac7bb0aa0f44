"""Turn benchmark results (one JSON object per line) into a markdown summary that links PNG figures.

``write_report("results.jsonl", "report/")`` writes ``report/report.md``: one table per task (accuracy with a 95%
interval, density, recall, speed, memory, errors), the dense baseline each method is judged against, and the
figures of :mod:`longattn.bench.figures` — accuracy heat maps over length × depth, accuracy against density,
attention recall per layer, and NLL per position bucket for the perplexity task. The numbers come from
:mod:`longattn.bench.results`. matplotlib is imported only when a report is drawn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from longattn.bench import figures
from longattn.bench.results import (
    Row,
    Section,
    baseline_cells,
    bucket_nll,
    label_of,
    load_results,
    ok_cells,
    sections,
    summarize,
    unique,
)

LEGEND = (
    "Accuracy is the mean score over depths and seeds with a 95% interval (Wilson for 0/1 scores), n non-error "
    "cells. Density is the share of causal query-key pairs computed in prefill; oracle is what the best key blocks "
    "would hold at the same budget (recall's ceiling); output error is the relative error of attention outputs "
    "against dense on sampled rows; KL first token is the divergence of the answer position's next-token "
    "distribution from dense's (nats). Recall is the share of dense "
    "attention mass the selection keeps (mean / 10th percentile). Speed-up is dense prefill time / method prefill "
    "time at the same task and length. Peak memory is the largest over the cells (model weights included); added "
    "memory is the most a cell grew above what was resident when it began. Errored cells are excluded "
    "from every mean."
)


def write_report(results: str | Path | list[dict], out_dir: str | Path) -> Path:
    """Write ``report.md`` and its PNG figures into ``out_dir`` (created if needed).

    Args:
        results: a results JSONL path, or records already loaded.
        out_dir: folder for ``report.md`` and the figures, which it links relatively.

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: there are no results, the file is malformed (see `load_results`), or ``out_dir`` is a file.
        ImportError: matplotlib is not installed.
    """
    source = Path(results) if isinstance(results, (str, Path)) else None
    records = load_results(source) if source else list(results)
    if not records:
        raise ValueError("no results to report")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={str(out)!r} is a file; the report needs a directory for report.md and figures")
    figures.require_matplotlib()
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    parts = sections(records, rows)
    lines = _header(records, source)
    for section in parts:
        lines += _section_markdown(section, out)
    lines += _overview_figures(records, parts, out)
    lines += _errors_markdown(records)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _header(records: Sequence[dict], source: Path | None) -> list[str]:
    errors = len(records) - len(ok_cells(records))
    origin = f" from `{source.name}`" if source else ""
    lines = ["# Benchmark report", "", f"{len(records)} cells{origin}, {errors} errored.", ""]
    lines.append(f"- Model: {', '.join(unique(str(r['model']) for r in records if r.get('model'))) or 'unknown'}")
    for name in ("hardware", "versions"):
        seen = unique(json.dumps(r[name], sort_keys=True) for r in records if r.get(name))
        described = "; ".join(", ".join(f"{k} {v}" for k, v in json.loads(s).items()) for s in seen)
        lines.append(f"- {name.capitalize()}: {described or 'unknown'}")
    times = sorted(str(r["time"]) for r in records if r.get("time"))
    if times:
        lines.append(f"- Run: {times[0]}" + (f" to {times[-1]}" if times[-1] != times[0] else ""))
    return lines + ["", LEGEND, ""]


def _section_markdown(section: Section, out: Path) -> list[str]:
    lines = [f"## {section.title}", ""] + _main_table(section) + ["", _baseline_line(section), ""]
    if section.perplexity:
        lines += _nll_tables(section)
        name = f"perplexity_{section.slug}.png"
        if figures.nll_by_position(section, out / name):
            lines += [f"![NLL by position, {section.title}]({name})", ""]
    name = f"heatmap_{section.slug}.png"
    if figures.accuracy_heatmap(section, out / name):
        lines += [f"![accuracy by length and depth, {section.title}]({name})", ""]
    return lines


def _overview_figures(records: Sequence[dict], parts: list[Section], out: Path) -> list[str]:
    lines = []
    if figures.accuracy_vs_density([s for s in parts if not s.perplexity], out / "accuracy_vs_density.png"):
        lines += ["## Accuracy against density", "", "![accuracy against density](accuracy_vs_density.png)", ""]
    if figures.recall_per_layer(records, out / "recall_per_layer.png"):
        lines += ["## Attention recall per layer", "",
                  "Solid: mean recall; dashed: 10th percentile; averaged over cells.", "",
                  "![attention recall per layer](recall_per_layer.png)", ""]
    return lines


def _main_table(section: Section) -> list[str]:
    followup = any(r.first_accuracy is not None for r in section.rows)
    quality = "NLL (n)" if section.perplexity else "accuracy [95% CI] (n)"
    header = ["method", "length", quality] + (["first turn"] if followup else []) + [
        "density", "recall mean / p10", "oracle", "output error", "KL first token", "prefill s", "speed-up vs dense",
        "decode ms/token",
        f"peak MiB ({'/'.join(unique(str(c.get('mem_kind')) for c in section.cells)) or '?'})", "added MiB",
        "errors"]
    body = []
    for r in section.rows:
        score = f"{_fmt(r.nll, 3)} ({r.n})" if section.perplexity else _accuracy(r)
        recall = "—" if r.recall_mean is None else f"{_fmt(r.recall_mean, 3)} / {_fmt(r.recall_p10, 3)}"
        speedup = "—" if r.speedup is None else f"{r.speedup:.2f}×"
        body.append([r.label, str(r.length), score] + ([_fmt(r.first_accuracy, 2)] if followup else []) + [
            _fmt(r.density, 3), recall, _fmt(r.oracle_mean, 3), _fmt(r.output_error, 3), _fmt(r.kl_first, 3),
            _fmt(r.prefill_s, 2), speedup, _fmt(r.decode_ms_per_token, 1),
            _fmt(r.peak_mem_mib, 0), _fmt(r.added_mem_mib, 0), str(r.errors)])
    return _table(header, body)


def _accuracy(r: Row) -> str:
    if r.accuracy is None:
        return f"— ({r.n})"
    return f"{r.accuracy:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] ({r.n})"


def _baseline_line(section: Section) -> str:
    labels = {label_of(c) for c in baseline_cells(section.cells)}
    dense = [r for r in section.rows if r.label in labels]
    if not dense:
        return ("No dense cells for this task: whether the model can answer it at these lengths at all is unknown, "
                "so low scores may not be the method's fault.")
    what, key = ("NLL", "nll") if section.perplexity else ("accuracy", "accuracy")
    parts = [f"{_fmt(getattr(r, key), 3 if section.perplexity else 2)} at {r.length}" for r in dense]
    return f"Dense baseline {what}: {', '.join(parts)}."


def _nll_tables(section: Section) -> list[str]:
    labels = unique(r.label for r in section.rows)
    lengths = sorted({r.length for r in section.rows})
    nll = {(r.label, r.length): r.nll for r in section.rows}
    lines = ["Mean NLL per token (nats):", ""]
    lines += _table(["method"] + [str(n) for n in lengths], [
        [label] + [_fmt(nll.get((label, n)), 3) for n in lengths] for label in labels])
    buckets = bucket_nll(section.cells)
    for length in lengths:
        spans = sorted({span for (_, n), b in buckets.items() if n == length for span in b})
        if not spans:
            continue
        lines += ["", f"Mean NLL by position at length {length}:", ""]
        lines += _table(["method"] + [f"{s}–{e}" for s, e in spans], [
            [label] + [_fmt(buckets.get((label, length), {}).get(span), 3) for span in spans]
            for label in labels if (label, length) in buckets])
    return lines + [""]


def _errors_markdown(records: Sequence[dict]) -> list[str]:
    failed = [r for r in records if r.get("error") is not None]
    if not failed:
        return []
    body = [[label_of(r), r["task"], str(r["length"]), str(r.get("depth")), str(r["seed"]), str(r["error"])]
            for r in failed]
    return ["## Errors", ""] + _table(["method", "task", "length", "depth", "seed", "error"], body)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        # A "|" or newline inside an error message would otherwise break the table.
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(row) for row in body]


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
