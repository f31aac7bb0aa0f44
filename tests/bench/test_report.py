"""The results report: intervals, grouping and averages, error handling, markdown numbers and PNG figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from longattn.bench.report import Row, interval, load_results, summarize, write_report

PNG = b"\x89PNG"


def cell(**overrides):
    """One result line with every optional key filled; overrides replace fields."""
    record = {
        "schema": 1, "key": "k", "task": "niah_single", "haystack": "natural", "method": "moba", "config": {},
        "label": None, "model": "SmolLM2-135M-Instruct.Q4_1.gguf", "length": 2048, "tokens": 2040, "depth": 0.5,
        "seed": 0, "prediction": "x", "answer": "x", "score": 1.0, "density": 0.2, "recall": None,
        "prefill_s": 1.0, "decode_s": 0.08, "decode_tokens": 8, "peak_mem_bytes": 100 * 2**20, "mem_kind": "rss",
        "first": None, "nll": None, "error": None,
        "hardware": {"device": "cpu", "name": "AMD EPYC 7B13", "threads": 2},
        "versions": {"longattn": "0.1.0", "torch": "2.13.0"}, "time": "2026-11-23T10:00:00",
    }
    record.update(overrides)
    return record


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def recall(mean, p10, layers=3):
    return {"mean": mean, "p10": p10, "per_layer_mean": [mean] * layers, "per_layer_p10": [p10] * layers}


def needle_fixture():
    """moba at 4096 and 2048 (4096 listed first), dense at 2048 only, and one errored moba cell."""
    moba_2k = [cell(score=s, depth=d, seed=i, density=dens, prefill_s=p, recall=recall(0.9, 0.6))
               for i, (s, d, dens, p) in enumerate([(1.0, 0.0, 0.1, 0.4), (0.0, 1.0, 0.3, 0.6),
                                                    (1.0, 0.0, 0.2, 0.5), (1.0, 1.0, 0.2, 0.5)])]
    moba_4k = [cell(length=4096, score=0.0, depth=d, density=0.05, prefill_s=1.0, seed=i, recall=recall(0.7, 0.3))
               for i, d in enumerate([0.0, 1.0])]
    dense = [cell(method="dense", score=s, depth=d, density=1.0, prefill_s=p, seed=i, recall=recall(1.0, 1.0),
                  decode_s=ds, decode_tokens=dt, peak_mem_bytes=m)
             for i, (s, d, p, ds, dt, m) in enumerate([(1.0, 0.0, 1.5, 0.1, 10, 200 * 2**20),
                                                       (1.0, 1.0, 2.5, 0.3, 10, 300 * 2**20)])]
    failed = cell(score=None, prefill_s=100.0, density=0.9, seed=9, error="RuntimeError: out | of memory")
    return moba_4k + moba_2k + [failed] + dense


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


def test_minimal_records_without_optional_keys(tmp_path):
    records = [{"task": "t", "method": "m", "length": 128, "seed": s, "score": s % 2} for s in range(4)]
    (row,) = summarize(records)
    assert (row.n, row.accuracy, row.density, row.prefill_s, row.speedup) == (4, 0.5, None, None, None)
    text = write_report(records, tmp_path).read_text()
    assert "| m | 128 | 0.50 [" in text and "No dense cells" in text
    assert not list(tmp_path.glob("*.png"))  # no depth, no density, no recall: nothing to draw


def test_report_has_numbers_errors_baseline_and_pngs(tmp_path):
    results = write_jsonl(tmp_path / "results.jsonl", needle_fixture())
    md = write_report(results, tmp_path / "report")
    text = md.read_text()
    assert md == tmp_path / "report" / "report.md"
    moba_line = next(line for line in text.splitlines() if line.startswith("| moba | 2048 |"))
    low, high = interval([1, 0, 1, 1])[1:]
    assert f"0.75 [{low:.2f}, {high:.2f}] (4)" in moba_line
    assert "| 0.200 |" in moba_line and "| 0.900 / 0.600 |" in moba_line and "4.00×" in moba_line
    assert moba_line.endswith("| 1 |")
    assert "Dense baseline accuracy: 1.00 at 2048." in text
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in text and "AMD EPYC 7B13" in text and "torch 2.13.0" in text
    errors = text[text.index("## Errors"):]
    assert "| moba | niah_single | 2048 | 0.5 | 9 | RuntimeError: out \\| of memory |" in errors
    names = {"heatmap_niah_single_natural.png", "accuracy_vs_density.png", "recall_per_layer.png"}
    assert {p.name for p in md.parent.glob("*.png")} == names
    for name in names:
        assert f"]({name})" in text
        assert (md.parent / name).read_bytes()[:4] == PNG


def test_heatmap_skipped_without_depths(tmp_path):
    records = [cell(depth=None, seed=s, score=float(s % 2)) for s in range(4)]
    md = write_report(records, tmp_path)
    assert not list(tmp_path.glob("heatmap_*.png")) and "heatmap_" not in md.read_text()
    assert (tmp_path / "accuracy_vs_density.png").read_bytes()[:4] == PNG


def test_recall_figure_skipped_when_only_dense_has_recall(tmp_path):
    records = [cell(method="dense", density=1.0, recall=recall(1.0, 1.0)), cell(recall=None)]
    write_report(records, tmp_path)
    assert not (tmp_path / "recall_per_layer.png").exists()


def test_followup_first_turn_column(tmp_path):
    records = [cell(task="niah_followup", score=1.0, first={"prediction": "a", "answer": "a", "score": s}, seed=i)
               for i, s in enumerate([1.0, 0.0])]
    (row,) = summarize(records)
    assert row.first_accuracy == pytest.approx(0.5)
    text = write_report(records, tmp_path).read_text()
    assert "| first turn |" in text and "| moba | 2048 | 1.00 [" in text


def perplexity_cell(label, length, nlls, error=None):
    buckets = [{"start": 1024 * i, "end": 1024 * (i + 1), "nll": v, "tokens": 1024} for i, v in enumerate(nlls)]
    return cell(task="perplexity", haystack=None, depth=None, score=None, method=label, error=error, length=length,
                nll={"mean": sum(nlls) / len(nlls), "eval_tokens": 1024 * len(nlls), "buckets": buckets})


def test_perplexity_tables_and_figure(tmp_path):
    records = [perplexity_cell("dense", 2048, [3.0, 2.0]), perplexity_cell("moba", 2048, [3.0, 2.5]),
               perplexity_cell("moba", 2048, [3.2, 2.7]), perplexity_cell("moba", 2048, [9.0, 9.0], error="E: x")]
    rows = summarize(records)
    assert [(r.label, r.nll, r.accuracy) for r in rows] == [("dense", 2.5, None), ("moba", pytest.approx(2.85), None)]
    md = write_report(records, tmp_path)
    text = md.read_text()
    assert "| NLL (n) |" in text and "accuracy [95% CI]" not in text
    assert "Mean NLL per token" in text and "| moba | 2.850 |" in text
    assert "| method | 0–1024 | 1024–2048 |" in text and "| moba | 3.100 | 2.600 |" in text
    assert "Dense baseline NLL: 2.500 at 2048." in text
    assert (tmp_path / "perplexity_perplexity.png").read_bytes()[:4] == PNG
    assert "](perplexity_perplexity.png)" in text
    assert not (tmp_path / "accuracy_vs_density.png").exists()


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


def test_empty_results_raise(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no results"):
        load_results(path)
    with pytest.raises(ValueError, match="no results"):
        write_report([], tmp_path / "out")


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, longattn.bench.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_added_memory_is_the_largest_growth_and_is_reported(tmp_path):
    records = [cell(seed=0, mem_delta_bytes=3 * 2**20), cell(seed=1, mem_delta_bytes=5 * 2**20),
               cell(seed=2, mem_delta_bytes=None)]
    (row,) = summarize(records)
    assert row.added_mem_mib == pytest.approx(5.0)
    text = write_report(records, tmp_path).read_text()
    assert "added MiB" in text and "| 5 |" in text


@pytest.mark.parametrize("k,n", [(n, n) for n in range(1, 13)] + [(0, n) for n in range(1, 13)])
def test_interval_always_holds_its_mean(k, n):
    mean, low, high = interval([1.0] * k + [0.0] * (n - k))
    assert low <= mean <= high
