"""Result records for the report tests: one cell with every key filled, and small sweeps built from it."""

from __future__ import annotations

import json

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


def perplexity_cell(label, length, nlls, error=None):
    buckets = [{"start": 1024 * i, "end": 1024 * (i + 1), "nll": v, "tokens": 1024} for i, v in enumerate(nlls)]
    return cell(task="perplexity", haystack=None, depth=None, score=None, method=label, error=error, length=length,
                nll={"mean": sum(nlls) / len(nlls), "eval_tokens": 1024 * len(nlls), "buckets": buckets})
