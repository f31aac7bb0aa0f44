"""Benchmark results: intervals, grouping and averages, and loading JSONL with errors that name the line."""

from __future__ import annotations

import json
import math

import pytest

from longattn.bench.results import Row, interval, load_results, summarize
from tests.bench.records import cell, needle_fixture


@pytest.mark.parametrize("k, n, expected", [
    (5, 10, (0.5, 0.2366, 0.7634)),
    (0, 10, (0.0, 0.0, 0.2775)),
    (10, 10, (1.0, 0.7225, 1.0)),
    (1, 1, (1.0, 0.2065, 1.0)),
], ids=["5of10", "0of10", "10of10", "1of1"])
def test_wilson_interval_known_values(k, n, expected):
    got = interval([1.0] * k + [0.0] * (n - k))
    assert got == pytest.approx(expected, abs=1e-4)


def test_wilson_interval_matches_formula_and_shrinks_with_n():
    z = 1.96
    for k, n in [(3, 7), (17, 40)]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert interval([1] * k + [0] * (n - k)) == pytest.approx((p, centre - half, centre + half))
    small, large = interval([1, 0] * 5), interval([1, 0] * 50)
    assert large[2] - large[1] < small[2] - small[1]


def test_normal_interval_for_fractional_scores_is_clipped_to_unit_range():
    mean, low, high = interval([0.5, 0.7, 0.9])
    half = 1.96 * 0.2 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((0.7, 0.7 - half, 0.7 + half))
    assert interval([0.5, 1.0, 1.0, 1.0])[2] == 1.0
    assert interval([0.4]) == pytest.approx((0.4, 0.4, 0.4))


def test_interval_of_nothing_raises():
    with pytest.raises(ValueError, match="at least one"):
        interval([])


@pytest.mark.parametrize("k,n", [(n, n) for n in range(1, 13)] + [(0, n) for n in range(1, 13)])
def test_interval_always_holds_its_mean(k, n):
    mean, low, high = interval([1.0] * k + [0.0] * (n - k))
    assert low <= mean <= high


def test_summarize_groups_orders_and_averages():
    rows = summarize(needle_fixture())
    assert [(r.label, r.length) for r in rows] == [("moba", 2048), ("moba", 4096), ("dense", 2048)]
    moba, moba_4k, dense = rows
    assert (moba.n, moba.errors) == (4, 1)
    assert moba.accuracy == pytest.approx(0.75)
    assert (moba.ci_low, moba.ci_high) == pytest.approx(interval([1, 0, 1, 1])[1:])
    assert moba.density == pytest.approx(0.2)  # the errored cell's 0.9 is not in the mean
    assert moba.prefill_s == pytest.approx(0.5)  # nor its 100 s
    assert moba.speedup == pytest.approx(2.0 / 0.5)
    assert (moba.recall_mean, moba.recall_p10) == pytest.approx((0.9, 0.6))
    assert moba.decode_ms_per_token == pytest.approx(10.0)
    assert moba_4k.accuracy == 0.0 and moba_4k.speedup is None  # no dense cell at 4096
    assert dense.speedup == pytest.approx(1.0) and dense.accuracy == 1.0
    assert dense.decode_ms_per_token == pytest.approx(1000 * 0.4 / 20)
    assert dense.peak_mem_mib == pytest.approx(300.0)
    assert moba.first_accuracy is None and moba.nll is None
    assert isinstance(moba, Row)


def test_label_separates_configs_of_one_method_and_haystacks_are_not_pooled():
    records = [cell(label="moba[top_k=8]", score=0.0), cell(score=1.0), cell(haystack="repeat", score=0.0)]
    rows = summarize(records)
    assert [(r.label, r.haystack, r.accuracy) for r in rows] == [
        ("moba[top_k=8]", "natural", 0.0), ("moba", "natural", 1.0), ("moba", "repeat", 0.0)]


def test_load_results_skips_blank_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(cell()) + "\n\n   \n" + json.dumps(cell(seed=1)) + "\n")
    assert [r["seed"] for r in load_results(path)] == [0, 1]


@pytest.mark.parametrize("bad, message", [
    ('{"task": "t", "method": "m", "length": 1, "seed": 0', "line 3: not valid JSON"),
    ('{"task": "t", "method": "m", "length": 1}', "line 3: missing required key.*seed"),
    ('[1, 2]', "line 3: expected a JSON object"),
], ids=["truncated", "missing-key", "not-object"])
def test_load_results_names_the_bad_line(tmp_path, bad, message):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(cell()) + "\n\n" + bad + "\n")
    with pytest.raises(ValueError, match=message) as err:
        load_results(path)
    assert "r.jsonl" in str(err.value)
