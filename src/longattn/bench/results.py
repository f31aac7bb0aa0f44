"""Benchmark results (one JSON object per line): loading, grouping into rows, intervals and the statistics the
report and its figures draw on.

``summarize(load_results("results.jsonl"))`` gives one `Row` per (task, haystack, label, length): accuracy with
a 95% interval, density, recall, speed, memory and error counts. Nothing here imports matplotlib.
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
        oracle_mean: what the best key blocks would hold at the selection's budget (the recall's ceiling), mean.
        output_error: relative error of the attention output against dense on sampled rows, mean.
        kl_first: KL divergence (nats) of the answer position's next-token distribution from dense's, mean.
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
    oracle_mean: float | None = None
    output_error: float | None = None
    kl_first: float | None = None


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
        order.setdefault(label_of(r), len(order))
        groups[(r["task"], r.get("haystack"), label_of(r), r["length"])].append(r)
    dense = _dense_prefill(records)
    keys = sorted(groups, key=lambda k: (k[0], k[1] or "", order[k[2]], k[3]))
    return [_row(k, groups[k], dense.get((k[0], k[1], k[3]))) for k in keys]


def _row(key: tuple, cells: list[dict], dense_prefill: float | None) -> Row:
    task, haystack, label, length = key
    ok = ok_cells(cells)
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
        oracle_mean=_mean(r.get("oracle_mean") for r in recalls),
        output_error=_mean(r.get("output_error_mean") for r in recalls),
        kl_first=_mean(c.get("kl_first") for c in ok),
    )


def _dense_prefill(records: Sequence[dict]) -> dict[tuple, float]:
    """Mean dense prefill seconds per (task, haystack, length)."""
    times = defaultdict(list)
    for r in baseline_cells(ok_cells(records)):
        if r.get("prefill_s") is not None:
            times[(r["task"], r.get("haystack"), r["length"])].append(r["prefill_s"])
    return {k: sum(v) / len(v) for k, v in times.items()}


def baseline_cells(cells: Iterable[dict]) -> list[dict]:
    """The dense cells methods are judged against: dense on SDPA where there are any, else any dense cell."""
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


def label_of(record: dict) -> str:
    """A record's display label: its ``label``, else its ``method``."""
    return record.get("label") or record["method"]


def ok_cells(cells: Iterable[dict]) -> list[dict]:
    """The cells that did not raise."""
    return [c for c in cells if c.get("error") is None]


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def unique(items: Iterable[Any]) -> list[Any]:
    """``items`` without repeats, in order of first appearance."""
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class Section:
    """One task (and haystack) of the report: its rows and its cells."""

    task: str
    haystack: str | None
    rows: list[Row]
    cells: list[dict]

    @property
    def title(self) -> str:
        return self.task if self.haystack is None else f"{self.task} ({self.haystack} haystack)"

    @property
    def slug(self) -> str:
        """The title as a file-name part."""
        name = self.task if self.haystack is None else f"{self.task}_{self.haystack}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)

    @property
    def perplexity(self) -> bool:
        return self.task == "perplexity" or any(c.get("nll") for c in self.cells)


def sections(records: Sequence[dict], rows: list[Row]) -> list[Section]:
    """One `Section` per (task, haystack) of ``rows``, in their order."""
    keys = unique((r.task, r.haystack) for r in rows)
    return [
        Section(task, hay, [r for r in rows if (r.task, r.haystack) == (task, hay)],
                [c for c in records if (c["task"], c.get("haystack")) == (task, hay)])
        for task, hay in keys
    ]


def bucket_nll(cells: Iterable[dict]) -> dict[tuple[str, int], dict[tuple[int, int], float]]:
    """Mean NLL of each position bucket ``(start, end)``, per (label, length), over non-error cells."""
    values: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in ok_cells(cells):
        for b in (c.get("nll") or {}).get("buckets") or []:
            if b.get("nll") is not None:
                values[(label_of(c), c["length"])][(b["start"], b["end"])].append(b["nll"])
    return {k: {span: sum(v) / len(v) for span, v in spans.items()} for k, spans in values.items()}


def recall_curves(records: Sequence[dict]) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Per (label, length): per-layer mean and p10 recall averaged over non-error cells."""
    per_layer = defaultdict(lambda: ([], []))
    for c in ok_cells(records):
        recall = c.get("recall") or {}
        if recall.get("per_layer_mean"):
            means, p10s = per_layer[(label_of(c), c["length"])]
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
