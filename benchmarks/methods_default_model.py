"""The published method comparison: every method on the default model, passkey and niah_single, 2k/4k/8k.

    python benchmarks/methods_default_model.py [--out docs/results/methods] [--lengths 2k,4k,8k] [--seeds 3]

Runs the sweep into ``<out>/results.jsonl`` (resumable: an interrupted run continues where it stopped), then
writes ``<out>/report.md`` and its figures. Seeds 0-1 of every length run first, then the other seeds, so a
run cut short still covers every length.
`streaming` gets the same token budget as `moba` (sinks + a window as wide as moba's window + top-k blocks), so
the two differ only in *which* blocks they keep. On 2 CPU cores the full sweep takes about 80 minutes.
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

# (task, haystack). niah_single reads repeated filler too: on natural text (pydoc_data) dense attention on the
# default 135M model answered 6/6 at 2k but 0/3 at 4k, so a natural-text sweep would not tell methods apart.
TASKS = (("passkey", "repeat"), ("niah_single", "repeat"))


def methods() -> dict[str, longattn.Method]:
    moba = longattn.get_method("moba")
    budget = moba.window + moba.top_k * moba.block_size
    return {
        "dense": longattn.get_method("dense"),
        "streaming": longattn.get_method("streaming", block_size=moba.block_size, window=budget),
        "moba": moba,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/methods"))
    parser.add_argument("--lengths", default="2k,4k,8k")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--recall-queries", type=int, default=32)
    args = parser.parse_args()
    console = Console()
    results = args.out / "results.jsonl"
    chosen = methods()
    for label, method in chosen.items():
        console.print(f"{label}: {method}")
    console.print(f"torch threads {torch.get_num_threads()}; writing {results}")
    with console.status("loading model"):
        model, tok = longattn.load_model()
    depths = [float(d) for d in args.depths.split(",")]
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=console)
    # Two passes: every length with the first two seeds, then the remaining seeds. A run stopped part-way still
    # covers every length evenly, and the next run resumes where it stopped.
    passes = [list(range(min(2, args.seeds))), list(range(2, args.seeds))]
    with progress:
        for seeds in filter(None, passes):
            for length in parse_lengths(args.lengths):
                for task, haystack in TASKS:
                    run_sweep(model, tok, tasks=[task], methods=chosen, lengths=[length], depths=depths, seeds=seeds,
                              out=results, model_id=DEFAULT_GGUF, haystacks=[haystack],
                              recall_queries=args.recall_queries, progress=progress)
    console.print(f"report: {write_report(results, args.out)}")


if __name__ == "__main__":
    main()
