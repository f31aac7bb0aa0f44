"""The markdown report: numbers, baselines, errors, which figures it links, and its own errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from longattn.bench.report import write_report
from longattn.bench.results import interval, load_results, summarize
from tests.bench.records import PNG, cell, needle_fixture, perplexity_cell, recall, write_jsonl


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


def test_empty_results_raise(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no results"):
        load_results(path)
    with pytest.raises(ValueError, match="no results"):
        write_report([], tmp_path / "out")


def test_an_out_dir_that_is_a_file_raises_before_writing(tmp_path):
    taken = tmp_path / "report"
    taken.write_text("not a folder")
    with pytest.raises(ValueError, match="out_dir=.*is a file"):
        write_report([cell()], taken)
    assert taken.read_text() == "not a folder"


def test_importing_the_modules_does_not_import_matplotlib():
    code = ("import sys, longattn.bench.report, longattn.bench.results, longattn.bench.figures; "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_writing_a_report_leaves_the_callers_backend_and_pyplot_alone(tmp_path):
    """A notebook's backend survives a report: no matplotlib.use, no pyplot (which would pick a backend)."""
    import matplotlib

    before = matplotlib.get_backend()
    write_report(needle_fixture(), tmp_path)
    assert matplotlib.get_backend() == before
    # In a fresh process, with a backend the caller chose, pyplot must not even be imported.
    code = ("import sys, matplotlib; matplotlib.use('svg'); from longattn.bench.report import write_report; "
            "from tests.bench.records import needle_fixture; write_report(needle_fixture(), sys.argv[1]); "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh")], check=True)
    assert len(list((tmp_path / "fresh").glob("*.png"))) == 3


def test_added_memory_is_the_largest_growth_and_is_reported(tmp_path):
    records = [cell(seed=0, mem_delta_bytes=3 * 2**20), cell(seed=1, mem_delta_bytes=5 * 2**20),
               cell(seed=2, mem_delta_bytes=None)]
    (row,) = summarize(records)
    assert row.added_mem_mib == pytest.approx(5.0)
    text = write_report(records, tmp_path).read_text()
    assert "added MiB" in text and "| 5 |" in text
