"""The sweep runner on a tiny model: one line per cell, resume without duplicates, errors recorded, all task kinds."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoTokenizer

import longattn
from longattn.bench import runner
from longattn.bench.tasks import TASKS, Example
from longattn.methods.base import Method
from tests.conftest import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_checkpoint(path)
    return longattn.load_model(path)


def _words(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(3, 256, (n,), generator=g))


def _task(kind: str = "generate") -> types.SimpleNamespace:
    """A task over the tiny word-level vocabulary: the "answer" is the token the random model says first."""

    def make(tokenizer, length, depth, seed, *, haystack="repeat"):
        meta = {"tokens": length, "depth": depth, "seed": seed, "eval_tokens": 16,
                "followup": {"prompt": _words(seed + 100, 5), "answer": "w9"}}
        return Example(prompt=_words(seed, length), answer="w7", meta=meta)

    return types.SimpleNamespace(
        KIND=kind, MAX_NEW_TOKENS=3, HAYSTACKS=("repeat",), make=make,
        score=lambda ex, out: float(ex.answer in out.split()),
        score_followup=lambda ex, out: float(ex.meta["followup"]["answer"] in out.split()),
    )


@dataclass
class Broken(Method):
    """A method whose selection always fails (to check that errors are recorded, not fatal)."""

    name = "broken"

    def block_mask(self, q, summaries, ctx, qbs, prepared=None):
        raise RuntimeError("selection exploded")


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _sweep(tiny, out, monkeypatch, kind="generate", methods=None, **kw):
    monkeypatch.setitem(TASKS, "toy", _task(kind))
    model, tok = tiny
    methods = methods or {"dense": longattn.get_method("dense"),
                          "moba": longattn.get_method("moba", block_size=8, top_k=1, window=8)}
    args = dict(tasks=["toy"], methods=methods, lengths=[160], depths=[0.2, 0.8], seeds=[0, 1], out=out,
                model_id="tiny", recall_queries=8)
    args.update(kw)
    return runner.run_sweep(model, tok, **args)


def test_sweep_writes_one_line_per_cell_and_resumes(tiny, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    first = _sweep(tiny, out, monkeypatch)
    assert (first.ran, first.skipped, first.failed) == (8, 0, 0)
    lines = _lines(out)
    assert len(lines) == 8 and len({r["key"] for r in lines}) == 8
    for r in lines:
        assert r["error"] is None and r["score"] in (0.0, 1.0) and r["prefill_s"] > 0
        assert r["hardware"]["device"] == "cpu" and r["versions"]["torch"] == torch.__version__
        assert r["peak_mem_bytes"] > 0 and r["mem_kind"] == "rss"
        if r["label"] == "dense":
            assert r["density"] == pytest.approx(1.0) and r["recall"]["mean"] == pytest.approx(1.0, abs=1e-5)
        else:
            assert r["density"] < 0.6 and r["recall"]["mean"] < 0.999
            assert len(r["recall"]["per_layer_mean"]) == 2
    # Identical prompts for both methods of a cell: dense and moba answer the same question.
    again = _sweep(tiny, out, monkeypatch)
    assert (again.ran, again.skipped) == (0, 8) and len(_lines(out)) == 8
    # A new seed runs only the new cells.
    more = _sweep(tiny, out, monkeypatch, seeds=[0, 1, 2])
    assert (more.ran, more.skipped) == (4, 8) and len(_lines(out)) == 12


def test_a_failing_method_is_recorded_and_the_sweep_goes_on(tiny, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    summary = _sweep(tiny, out, monkeypatch, methods={"broken": Broken(), "dense": longattn.get_method("dense")},
                     depths=[0.5], seeds=[0])
    assert (summary.ran, summary.failed) == (2, 1)
    by_label = {r["label"]: r for r in _lines(out)}
    broken, dense = by_label["broken"], by_label["dense"]
    assert broken["error"] == "RuntimeError: selection exploded" and broken["score"] is None
    assert dense["error"] is None and dense["score"] is not None


def test_followup_continues_the_cache(tiny, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    _sweep(tiny, out, monkeypatch, kind="followup", depths=[0.5], seeds=[0])
    for r in _lines(out):
        assert r["first"]["answer"] == "w7" and r["first"]["prediction"]
        assert r["prediction"] and r["followup_prefill_s"] > 0 and r["error"] is None
    dense, moba = _lines(out)
    # Dense, continued through the cache, must say what dense says on the whole conversation at once.
    model, tok = tiny
    ex = TASKS["toy"].make(tok, 160, 0.5, 0)
    first = tok(ex.prompt + " " + dense["first"]["prediction"], add_special_tokens=False, return_tensors="pt").input_ids
    follow = tok(ex.meta["followup"]["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(torch.cat([first, follow], 1)).logits[0, -1]
    assert dense["prediction"].split()[0] == tok.decode(logits.argmax())


def test_nll_task_matches_the_model_loss(tiny, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    _sweep(tiny, out, monkeypatch, kind="nll", methods={"dense": longattn.get_method("dense")})
    lines = _lines(out)
    assert len(lines) == 2 and all(r["depth"] is None for r in lines)  # depths do not apply to perplexity
    model, tok = tiny
    ids = tok(TASKS["toy"].make(tok, 160, 0.0, 0).prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    nll = lines[0]["nll"]
    total = sum(b["nll"] * b["tokens"] for b in nll["buckets"]) / sum(b["tokens"] for b in nll["buckets"])
    assert total == pytest.approx(float(loss), rel=1e-4)
    assert nll["eval_tokens"] == 16 and lines[0]["score"] is None


def test_bad_arguments(tiny, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown"):
        _sweep(tiny, tmp_path / "r.jsonl", monkeypatch, tasks=["nope"])
    with pytest.raises(ValueError, match="depths"):
        _sweep(tiny, tmp_path / "r.jsonl", monkeypatch, depths=[1.5])
    with pytest.raises(ValueError, match="haystack"):
        _sweep(tiny, tmp_path / "r.jsonl", monkeypatch, haystacks=["natural"])  # the toy task only has "repeat"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        _sweep(tiny, bad, monkeypatch)
    with pytest.raises(ValueError, match="out=.* is a directory"):
        _sweep(tiny, tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="paired depths and seeds must be as many"):
        _sweep(tiny, None, monkeypatch, depths=[0.5], seeds=[0, 1], paired=True)
    assert runner.parse_lengths("2k, 4096,0.5k") == [2048, 4096, 512]
    with pytest.raises(ValueError, match="lengths"):
        runner.parse_lengths("2x")


def test_records_are_returned_and_out_none_writes_nothing(tiny, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    written = _sweep(tiny, out, monkeypatch, depths=[0.5], seeds=[0])
    assert written.records == _lines(out)  # what the summary returns is what the file holds
    monkeypatch.chdir(tmp_path)
    kept = _sweep(tiny, None, monkeypatch, depths=[0.5], seeds=[0])
    assert (kept.ran, kept.skipped) == (2, 0) and [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]
    strip = ("time", "prefill_s", "decode_s", "recall_s", "peak_mem_bytes", "mem_delta_bytes", "recall")
    assert [{k: v for k, v in r.items() if k not in strip} for r in kept.records] == [
        {k: v for k, v in r.items() if k not in strip} for r in written.records]


def test_paired_runs_the_ith_seed_at_the_ith_depth(tiny, monkeypatch):
    summary = _sweep(tiny, None, monkeypatch, methods={"dense": longattn.get_method("dense")},
                     depths=[0.25, 0.75], seeds=[0, 1], paired=True, recall_queries=0)
    assert [(r["depth"], r["seed"]) for r in summary.records] == [(0.25, 0), (0.75, 1)]
    assert all(r["recall"] is None for r in summary.records)


def test_a_composed_method_records_a_config_that_rebuilds_it():
    from longattn.bench.cells import method_config

    moba = longattn.get_method("moba", block_size=16, top_k=3, window=32)
    duo = longattn.get_method("duo", retrieval_heads=((0, 1),), block_size=16, selector=moba)
    config = json.loads(json.dumps(method_config(duo)))  # what a results line holds
    assert config["selector"] == {"name": "moba", **method_config(moba)}
    assert longattn.get_method("duo", **config) == duo


def test_the_dtype_is_recorded_and_a_bfloat16_run_does_not_resume_a_float32_one(tiny, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    _sweep(tiny, out, monkeypatch, methods={"dense": longattn.get_method("dense")})
    path = tmp_path / "ckpt"
    save_tiny_checkpoint(path)
    again = _sweep(longattn.load_model(path, dtype=torch.bfloat16), out, monkeypatch,
                   methods={"dense": longattn.get_method("dense")})
    assert again.skipped == 0 and again.ran == 4
    assert [line["dtype"] for line in _lines(out)] == ["float32"] * 4 + ["bfloat16"] * 4


def test_every_method_is_compared_with_dense_at_the_answer_position(tiny, monkeypatch):
    methods = {"moba": longattn.get_method("moba", block_size=8, top_k=1, window=8),
               "dense": longattn.get_method("dense")}  # dense listed last still runs first
    records = _sweep(tiny, None, monkeypatch, methods=methods).records
    for r in records:
        assert r["kl_first"] is not None and r["kl_first"] >= 0
        if r["label"] == "dense":
            assert r["kl_first"] == pytest.approx(0.0, abs=1e-6)
    assert max(r["kl_first"] for r in records if r["label"] == "moba") > 1e-6
    assert all(r["recall"]["oracle_mean"] >= r["recall"]["mean"] - 1e-6 for r in records)
    # Without dense in the sweep there is nothing to compare with.
    alone = _sweep(tiny, None, monkeypatch, methods={"moba": methods["moba"]}).records
    assert all(r["kl_first"] is None for r in alone)
