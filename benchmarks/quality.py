"""Selection quality at ~10% density: each mechanism alone and combined, against dense, with 95% intervals.

    python benchmarks/quality.py --model smollm2-135m --lengths 2k,4k --prompts 30 [--configs dense,moba,...]
    python benchmarks/quality.py --model gemma-3-270m --lengths 8k --prompts 30

Every sparse config gets the budget of docs/results/library.md (16 sink tokens, a window of T/64 and enough
16-token blocks for ~0.051 T tokens per query: ~10% of the causal pairs); the mechanisms are the options every
scored method takes (``exact_last``, ``compensate``, ``top_p``) and the eviction baseline ``snapkv`` keeps the
same number of tokens per head. Prompts: ``--prompts`` per (config, length), depths spread evenly over [0.05,
0.95], paired with seeds 0..n-1 (the seed picks the phrasing of ``niah_phrased``). Each cell records accuracy,
density, attention recall and its oracle, output error per layer and the KL of the answer position from dense.
Resumable: results go to ``<out>/<model>.jsonl``; ``--report-only`` rewrites the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import longattn
from longattn.bench.report import write_report
from longattn.bench.runner import parse_lengths, run_sweep

BLOCK = 16
SINKS = 16
DENSITY = 0.10
TOKENS_PER_QUERY = 1 - (1 - DENSITY) ** 0.5  # budget B / T giving DENSITY for a uniform per-query budget


def budget(length: int) -> tuple[int, int]:
    """(window, top_k blocks) for ~DENSITY at ``length`` tokens."""
    window = length // 64
    top_k = round((TOKENS_PER_QUERY * length - SINKS - window - BLOCK / 2) / BLOCK)
    return window, max(top_k, 1)


def configs(length: int, decode_rank: int | None = 16) -> dict[str, Callable[[], longattn.Method]]:
    window, top_k = budget(length)
    common: dict[str, Any] = dict(block_size=BLOCK, sink_tokens=SINKS, window=window, top_k=top_k)
    sketch = dict(decode_rank=decode_rank)

    def moba(**extra: Any) -> Callable[[], longattn.Method]:
        return lambda: longattn.get_method("moba", **{**common, **extra})

    return {
        "dense": lambda: longattn.get_method("dense"),
        "streaming": lambda: longattn.get_method("streaming", block_size=BLOCK, sink_tokens=SINKS,
                                                 window=window + top_k * BLOCK),
        "moba": moba(),
        "moba+exact_last": moba(exact_last=True),
        "moba+compensate": moba(compensate=True),
        "moba+exact_last+compensate": moba(exact_last=True, compensate=True),
        "moba+top_p": moba(top_p=0.9),
        "blockmax": lambda: longattn.get_method("blockmax", **common, **sketch),
        "blockmax+compensate": lambda: longattn.get_method("blockmax", **common, **sketch, compensate=True),
        "blockmax+exact_last+compensate": lambda: longattn.get_method("blockmax", **common, **sketch,
                                                                      exact_last=True, compensate=True),
        "blockmax+layers": lambda: longattn.get_method("blockmax", **common, **sketch, min_layer_mass=0.75),
        "blockmax+layers+compensate": lambda: longattn.get_method("blockmax", **common, **sketch, min_layer_mass=0.75,
                                                                  compensate=True),
        # Sink-aware: 2 of the budget's blocks go to each head's hidden sinks (top_k lowered by as many).
        "blockmax+sinks": lambda: longattn.get_method("blockmax", **{**common, "top_k": max(1, top_k - 2)}, **sketch,
                                                      hidden_sinks=2),
        "moba+sinks": moba(hidden_sinks=2, top_k=max(1, top_k - 2)),
        "quest": lambda: longattn.get_method("quest", **common),
        "quest+exact_last": lambda: longattn.get_method("quest", **common, exact_last=True),
        "snapkv": lambda: longattn.get_method("snapkv", sink_tokens=SINKS, window=window,
                                              budget_tokens=top_k * BLOCK),
        "tova": lambda: longattn.get_method("tova", sink_tokens=SINKS, window=window, budget_tokens=top_k * BLOCK),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="an embedded model name (load_model)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/quality"))
    parser.add_argument("--configs", default="dense,moba,blockmax,blockmax+compensate,snapkv")
    parser.add_argument("--tasks", default="niah_phrased")
    parser.add_argument("--lengths", default="2k,4k")
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--recall-queries", type=int, default=8)
    parser.add_argument("--decode-rank", type=int, default=16,
                        help="blockmax's decode sketch rank (0: exact decode scores)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    console = Console()
    results = args.out / f"{args.model}.jsonl"
    if not args.report_only:
        lengths = parse_lengths(args.lengths)
        names = args.configs.split(",")
        unknown = sorted(set(names) - set(configs(2048)))
        if unknown:
            parser.error(f"--configs: unknown {unknown}; choose from {list(configs(2048))}")
        n = args.prompts
        depths = [0.05 + 0.9 * i / max(1, n - 1) for i in range(n)]
        console.print(f"torch threads {torch.get_num_threads()}; writing {results}")
        with console.status(f"loading {args.model}"):
            model, tok = longattn.load_model(args.model)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=console)
        with progress:
            for length in lengths:
                console.print(f"{length} tokens: window, top_k = {budget(length)}")
                made = {name: configs(length, args.decode_rank or None)[name]() for name in names}
                for task in args.tasks.split(","):
                    haystacks = ["natural"] if task in ("niah_phrased",) else ["repeat"]
                    run_sweep(model, tok, tasks=[task], methods=made, lengths=[length], depths=depths,
                              seeds=list(range(n)), out=results, model_id=args.model, haystacks=haystacks,
                              recall_queries=args.recall_queries, progress=progress, paired=True)
    console.print(f"report: {write_report(results, args.out / args.model)}")


if __name__ == "__main__":
    main()
