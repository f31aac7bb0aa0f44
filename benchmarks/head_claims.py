"""Reproduce the head papers' claims on the default model: retrieval-head share, causality, duo, act.

    python benchmarks/head_claims.py [--out docs/results/heads] [--only causality,duo,act] [--report-only]

Needs the profile written by `longattn heads profile --out docs/results/heads/smollm2_profile.json`.
Every experiment appends one JSON line per (prompt, method) to ``<out>/results.jsonl`` through the bench
harness (resumable: finished cells are skipped), then ``<out>/../heads.md``'s tables are printed from it.

- causality: niah_single (natural haystack) at 2k; dense vs the top-k retrieval heads masked vs k random
  heads masked (3 seeds). A masked head keeps only 4 sink tokens and a 64-token window, so it cannot reach
  the needle; k = the number of heads with retrieval score > 0.1.
- duo: niah_single (repeated filler) at 4k; dense vs streaming vs duo and razor with 25% of KV heads retrieving; the
  streaming heads and `streaming` keep 4 sinks + a 256-token window. KV-cache size is what a per-head cache
  would hold (Duo.kv_cache_tokens); the measured peak memory is today's full HF cache.
- fewer_heads: as causality, masking only the strongest 1, 2 and 4 retrieval heads.
- duo_sweep: as duo, at 10% and 50% shares, and at 25% with moba (64-token blocks, top 8) in the retrieval
  heads instead of full attention.
- act_gentle: act with factor 0.8, and act only in the heads whose profiled hidden-sink mass is >= 0.5.
- act: niah_multikey (repeat haystack, 3 distractor needles) at 2k, plain dense vs act (all heads, and only the profile's sink heads), per seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import longattn
from longattn.core.profile import HeadProfile
from longattn.bench.results import interval
from longattn.bench.runner import run_sweep
from longattn.hf import DEFAULT_GGUF

DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
MASK_SEEDS = (0, 1, 2)
CAUSALITY = dict(length=2048, seeds=[0, 1, 2])
# Repeated filler at 4k: dense answers every such prompt there, while on natural text this 135M model already
# fails at 4k (docs/results/methods/natural_partial), which would leave nothing for duo to keep.
DUO = dict(length=4096, seeds=[0, 1], share=0.25, sinks=4, window=256, haystack="repeat")
ACT = dict(task="niah_multikey", length=2048, depths=[0.25, 0.5, 0.75], seeds=list(range(8)))


def masked(profile: HeadProfile, heads: list[tuple[int, int]]) -> longattn.Method:
    """Every query head dense except ``heads``, which keep 4 sinks + a 64-token window."""
    keep = tuple((l, h) for l in range(profile.num_layers) for h in range(profile.num_heads) if (l, h) not in heads)
    return longattn.get_method("duo", retrieval_heads=keep, granularity="query_head", block_size=16, sink_tokens=4,
                               window=64)


def causality_methods(profile: HeadProfile) -> dict[str, longattn.Method]:
    scores = profile.scores()
    k = int((scores > 0.1).sum())
    order = torch.argsort(scores.flatten(), descending=True)[:k].tolist()
    top = [(i // profile.num_heads, i % profile.num_heads) for i in order]
    methods = {"dense": longattn.get_method("dense"), f"mask top-{k} retrieval": masked(profile, top)}
    others = [(l, h) for l in range(profile.num_layers) for h in range(profile.num_heads) if (l, h) not in top]
    for seed in MASK_SEEDS:
        methods[f"mask {k} random (seed {seed})"] = masked(profile, random.Random(seed).sample(others, k))
    return methods


def fewer_heads_methods(profile: HeadProfile) -> dict[str, longattn.Method]:
    """How few heads carry retrieval: mask only the strongest 1, 2 and 4."""
    order = torch.argsort(profile.scores().flatten(), descending=True).tolist()
    top = [(i // profile.num_heads, i % profile.num_heads) for i in order]
    return {f"mask top-{k} retrieval": masked(profile, top[:k]) for k in (1, 2, 4)}


def duo_sweep_methods(profile: HeadProfile) -> dict[str, longattn.Method]:
    """duo at other shares, and at 25% with moba's top-k instead of full attention in the retrieval heads."""
    common = dict(sink_tokens=DUO["sinks"], window=DUO["window"])
    return {
        "duo 10%": longattn.get_method("duo", profile=profile, retrieval_share=0.10, **common),
        "duo 50%": longattn.get_method("duo", profile=profile, retrieval_share=0.50, **common),
        "duo 25% + moba": longattn.get_method("duo", profile=profile, retrieval_share=DUO["share"], selector=longattn.get_method("moba", block_size=64, top_k=8),
                                             **common),
    }


def duo_methods(profile: HeadProfile) -> dict[str, longattn.Method]:
    common = dict(sink_tokens=DUO["sinks"], window=DUO["window"])
    return {
        "dense": longattn.get_method("dense"),
        "streaming": longattn.get_method("streaming", **common),
        "duo 25%": longattn.get_method("duo", profile=profile, retrieval_share=DUO["share"], **common),
        "razor 25%": longattn.get_method("razor", profile=profile, retrieval_share=DUO["share"], **common),
    }


def act_methods(profile: HeadProfile) -> dict[str, longattn.Method]:
    return {
        "dense": longattn.get_method("dense"),
        "act (all heads)": longattn.get_method("act"),
        "act (profile sink heads)": longattn.get_method("act", profile=profile),
    }


def sink_map_figure(model: object, tok: object, profile: HeadProfile, path: Path) -> Path:
    """Far attention received per token on one 1k natural-text needle prompt, for the strongest hidden-sink
    head, the strongest retrieval head and the most local head of the profile."""
    from longattn.analysis.heads import HeadRecorder
    from longattn.bench.figures import sink_map
    from longattn.bench.profiling import copy_hits, encode_needle_prompt
    from longattn.bench.tasks import niah_single

    ids, span = encode_needle_prompt(tok, niah_single.make(tok, 1024, 0.5, 0, haystack="natural"))
    recorder = HeadRecorder()
    copy_hits(model, ids, span, recorder, 4)
    heads = []
    for name, pick in (("hidden_sink_mass", torch.argmax), ("retrieval", torch.argmax), ("streaming", torch.argmax)):
        flat = int(pick(profile.scores(name).flatten()))
        heads.append((flat // profile.num_heads, flat % profile.num_heads))
    tokens = [tok.decode([t]) for t in ids[0].tolist()]
    return sink_map(recorder, heads, tokens, path)


def act_gentle_methods(profile: HeadProfile) -> dict[str, longattn.Method]:
    """Milder calibration after the first act run lost accuracy: a weaker factor, or only the strongest sink heads."""
    return {
        "act factor 0.8 (all heads)": longattn.get_method("act", factor=0.8),
        "act (heads with sink mass >= 0.5)": longattn.get_method("act", profile=profile, min_sink_mass=0.5),
    }


# ------------------------------------------------------------------------------------------------- report


def _load(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean_ci(values: list[float]) -> str:
    """Mean and its 95% interval (Wilson's for 0/1 scores, so 15/15 does not read as certain)."""
    if not values:
        return "-"
    mean, low, high = interval(values)
    return f"{mean:.2f} [{low:.2f}, {high:.2f}] (n={len(values)})"


def report(records: list[dict[str, Any]], profile: HeadProfile) -> str:
    lines = []
    share = profile.retrieval_share(0.1)
    count = int((profile.scores() > 0.1).sum())
    lines += [
        "### Retrieval-head share",
        "",
        f"{count} of {profile.num_layers * profile.num_heads} query heads ({share:.1%}) have retrieval score > 0.1 "
        f"(paper: < 5%); profile accuracy {profile.settings.get('accuracy', float('nan')):.2f} on "
        f"{profile.settings.get('prompts')} prompts.",
        "",
    ]
    by_exp: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_exp[r.get("experiment", "?")].append(r)

    def table(rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> list[str]:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            groups[r["label"]].append(r)
        head = "| method | accuracy [95% CI] | density | prefill s | peak MiB |" + ("".join(
            f" {k} |" for k in (extra or {})))
        out = [head, "|---" * (5 + len(extra or {})) + "|"]
        for label, group in groups.items():
            ok = [g for g in group if g.get("error") is None]
            acc = _mean_ci([float(g["score"]) for g in ok])
            dens = statistics.mean(g["density"] for g in ok if g.get("density") is not None) if ok else float("nan")
            pre = statistics.mean(g["prefill_s"] for g in ok) if ok else float("nan")
            mem = max(g.get("peak_mem_bytes") or 0 for g in ok) / 2**20 if ok else float("nan")
            cells = "".join(f" {fn(label)} |" for fn in (extra or {}).values())
            errors = len(group) - len(ok)
            note = f" ({errors} failed)" if errors else ""
            out.append(f"| {label}{note} | {acc} | {dens:.3f} | {pre:.1f} | {mem:.0f} |{cells}")
        return out

    if by_exp.get("causality"):
        lines += ["### Causality: masking retrieval heads vs random heads",
                  "", f"niah_single, natural haystack, {CAUSALITY['length']} tokens, depths {DEPTHS}, seeds "
                  f"{CAUSALITY['seeds']}.", ""]
        lines += table(by_exp["causality"]) + [""]
    if by_exp.get("fewer_heads"):
        lines += ["### How few heads: masking only the strongest retrieval heads", "",
                  "Same prompts as above (dense: see the causality table).", ""]
        lines += table(by_exp["fewer_heads"]) + [""]
    if by_exp.get("duo"):
        t = DUO["length"]

        def kv(label: str) -> str:
            dense = profile.num_layers * profile.num_kv_heads * t
            layout = (t, profile.num_layers, profile.num_heads, profile.num_kv_heads)
            if label == "dense":
                tokens = dense
            elif label == "streaming":  # a duo without retrieval heads keeps what streaming keeps
                tokens = longattn.get_method("duo", retrieval_heads=(), sink_tokens=DUO["sinks"],
                                             window=DUO["window"]).kv_cache_tokens(*layout)
            else:
                tokens = {**duo_methods(profile), **duo_sweep_methods(profile)}[label].kv_cache_tokens(*layout)
            mib = tokens * 2 * int(profile.model["head_dim"]) * 4 / 2**20  # K and V, float32
            return f"{mib:.1f} MiB ({tokens / dense:.0%})"

        lines += ["### duo / razor at a 25% retrieval-head share vs streaming and dense", "",
                  f"niah_single, {DUO['haystack']} haystack, {t} tokens, depths {DEPTHS}, seeds {DUO['seeds']}. KV cache = "
                  "what a per-head cache holds at this length (fp32 K+V).", ""]
        lines += table(by_exp["duo"] + by_exp.get("duo_sweep", []), {"KV cache (share of dense)": kv}) + [""]
    by_exp["act"] = by_exp.get("act", []) + by_exp.get("act_gentle", [])
    if by_exp.get("act"):
        lines += ["### act vs plain", "", f"{ACT['task']} at {ACT['length']} tokens, depths {ACT['depths']}, "
                  f"seeds {ACT['seeds']}: per-seed mean score, and the per-seed difference to dense.", ""]
        rows = by_exp["act"]
        lines += table(rows)
        per_seed: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r.get("error") is None:
                per_seed[r["label"]][r["seed"]].append(float(r["score"]))
        base = {s: statistics.mean(v) for s, v in per_seed.get("dense", {}).items()}
        lines += ["", "| method | mean difference to dense over seeds | sd | seeds better / equal / worse |",
                  "|---|---|---|---|"]
        for label, seeds in per_seed.items():
            if label == "dense":
                continue
            diffs = [statistics.mean(v) - base[s] for s, v in seeds.items() if s in base]
            if not diffs:
                continue
            sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
            tally = f"{sum(d > 0 for d in diffs)} / {sum(d == 0 for d in diffs)} / {sum(d < 0 for d in diffs)}"
            lines.append(f"| {label} | {statistics.mean(diffs):+.3f} | {sd:.3f} | {tally} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/heads"))
    parser.add_argument("--profile", type=Path, default=Path("docs/results/heads/smollm2_profile.json"))
    parser.add_argument("--only", default="causality,duo,act,fewer_heads,duo_sweep,act_gentle")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    console = Console()
    profile = HeadProfile.load(args.profile)
    results = args.out / "results.jsonl"
    if not args.report_only:
        with console.status("loading model"):
            model, tok = longattn.load_model()
        profile.check_model(model)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=console)
        plans = {
            "causality": lambda: (causality_methods(profile), "niah_single", [CAUSALITY["length"]], DEPTHS,
                                  CAUSALITY["seeds"], "natural"),
            "duo": lambda: (duo_methods(profile), "niah_single", [DUO["length"]], DEPTHS, DUO["seeds"],
                            DUO["haystack"]),
            "act": lambda: (act_methods(profile), ACT["task"], [ACT["length"]], ACT["depths"], ACT["seeds"], "repeat"),
            "act_gentle": lambda: (act_gentle_methods(profile), ACT["task"], [ACT["length"]], ACT["depths"],
                                   ACT["seeds"], "repeat"),
            "fewer_heads": lambda: (fewer_heads_methods(profile), "niah_single", [CAUSALITY["length"]], DEPTHS,
                                    CAUSALITY["seeds"], "natural"),
            "duo_sweep": lambda: (duo_sweep_methods(profile), "niah_single", [DUO["length"]], DEPTHS, DUO["seeds"],
                                  DUO["haystack"]),
        }
        console.print(f"torch threads {torch.get_num_threads()}; writing {results}")
        with progress:
            for name in args.only.split(","):
                methods, task, lengths, depths, seeds, haystack = plans[name]()
                scratch = args.out / f".{name}.jsonl"
                for seed in seeds:  # seed-major, so a stopped run still has whole seeds
                    run_sweep(model, tok, tasks=[task], methods=methods, lengths=lengths, depths=depths, seeds=[seed],
                              out=scratch, model_id=DEFAULT_GGUF, haystacks=[haystack], recall_queries=0,
                              progress=progress)
                _tag(scratch, results, name)
        console.print(f"sink map: {sink_map_figure(model, tok, profile, args.out / 'sink_map.png')}")
    console.print(report(_load(results), profile))


def _tag(scratch: Path, results: Path, experiment: str) -> None:
    """Copy the experiment's new records into ``results`` with an ``experiment`` field (keys deduplicated)."""
    seen = {r["key"] for r in _load(results)}
    with results.open("a") as sink:
        for record in _load(scratch):
            if record["key"] not in seen:
                sink.write(json.dumps({**record, "experiment": experiment}) + "\n")


if __name__ == "__main__":
    main()
