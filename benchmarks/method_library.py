"""The method library at equal density: every selection rule on the default model, niah_single, 2k/4k/8k.

    python benchmarks/method_library.py [--out docs/results/library] [--methods quest,hip] [--seeds 2]

Every sparse method gets the same token budget per query at each length, sized for ~10% of the causal
query-key pairs: 16 sink tokens, a window of T/64 tokens and enough 16-token blocks to reach ~0.051 T tokens
(density ~ 2B/T - (B/T)^2 for a budget of B tokens per query). `streaming` spends the retrieval budget on a
wider window, `retrieval` on single tokens, and `flexprefill` has no fixed budget: its threshold gamma is set so
that its measured density lands near the others' (see its row's density). Resumable; seed 0 of every length
runs first, then seed 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import longattn
from longattn.bench.report import write_report
from longattn.bench.runner import parse_lengths, run_sweep
from longattn.hf import DEFAULT_GGUF

BLOCK = 16
SINKS = 16
DENSITY = 0.10
TOKENS_PER_QUERY = 1 - (1 - DENSITY) ** 0.5  # budget B / T giving DENSITY for a uniform per-query budget
ORDER = ("dense", "streaming", "moba", "quest", "infllm", "longheads", "dhsa", "hip", "routing", "flexprefill",
         "retrieval")
FLEX_GAMMA = {2048: 0.65, 4096: 0.8, 8192: 0.9}  # ~0.10 density at 2k, ~0.08 at 4k on one prompt; 8k guessed


def budget(length: int) -> tuple[int, int]:
    """(window, top_k blocks) for ~DENSITY at ``length`` tokens."""
    window = length // 64
    # The query's own block adds ~BLOCK / 2 tokens on average beyond the window.
    top_k = round((TOKENS_PER_QUERY * length - SINKS - window - BLOCK / 2) / BLOCK)
    return window, max(top_k, 1)


def methods(length: int, names: list[str]) -> dict[str, longattn.Method]:
    window, top_k = budget(length)
    common = dict(block_size=BLOCK, sink_tokens=SINKS, window=window)
    build = {
        "dense": lambda: longattn.get_method("dense"),
        "streaming": lambda: longattn.get_method("streaming", **{**common, "window": window + top_k * BLOCK}),
        "retrieval": lambda: longattn.get_method("retrieval", block_size=1, sink_tokens=SINKS, window=window,
                                                 top_k=top_k * BLOCK),
        "flexprefill": lambda: longattn.get_method("flexprefill", **common, gamma=FLEX_GAMMA.get(length, 0.5)),
    }
    return {name: build[name]() if name in build else longattn.get_method(name, **common, top_k=top_k)
            for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/library"))
    parser.add_argument("--methods", default=",".join(ORDER))
    parser.add_argument("--lengths", default="2k,4k,8k")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--recall-queries", type=int, default=32)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    console = Console()
    results = args.out / "results.jsonl"
    if not args.report_only:
        names = args.methods.split(",")
        unknown = sorted(set(names) - set(ORDER))
        if unknown:
            parser.error(f"--methods: unknown {unknown}; choose from {list(ORDER)}")
        lengths = parse_lengths(args.lengths)
        for length in lengths:
            console.print(f"{length} tokens: window, top_k = {budget(length)}")
        console.print(f"torch threads {torch.get_num_threads()}; writing {results}")
        with console.status("loading model"):
            model, tok = longattn.load_model()
        depths = [float(d) for d in args.depths.split(",")]
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=console)
        with progress:
            for seed in range(args.seeds):
                for length in lengths:
                    run_sweep(model, tok, tasks=["niah_single"], methods=methods(length, names), lengths=[length],
                              depths=depths, seeds=[seed], out=results, model_id=DEFAULT_GGUF,
                              haystacks=["repeat"], recall_queries=args.recall_queries, progress=progress)
    console.print(f"report: {write_report(results, args.out)}")


if __name__ == "__main__":
    main()
