"""Context extension on the default model (trained to 8k tokens): dense vs selection methods x position policies.

    python benchmarks/extension.py [--labels moba/longheads,...] [--lengths 8k,16k,32k] [--tasks passkey,niah_single]
                                   [--depths 0.1,0.3,0.5,0.7,0.9] [--seeds 0,1] [--out docs/results/extension]
    python benchmarks/extension.py --report-only

Runs the sweep into ``<out>/results.jsonl`` (resumable: cells already there are skipped), then writes
``<out>/report.md`` with its heat maps. Prompts are prefilled in 2,048-token segments (``greedy_generate``'s
default), so peak memory is the KV cache plus one segment's activations. Labels are ``method/policy``;
``dense`` is PyTorch SDPA at real positions. On 2 CPU cores one 16k prompt takes ~2 minutes (dense SDPA, or a
sparse method at its default budget) to ~8 minutes (``dense/self_extend``), so the full grid (every label x 3
lengths x 2 tasks x 5 depths x 2 seeds) would take days: pass the subset to run.
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
from longattn.core.positions import POLICIES, DualChunk, SelfExtend
from longattn.hf import DEFAULT_GGUF

# passkey has only repeated filler; niah_single reads natural English (pydoc_data prose), the harder haystack.
HAYSTACK = {"passkey": "repeat", "niah_single": "natural"}
SELECTORS = ("moba", "quest", "infllm", "longheads")


def configs() -> dict[str, longattn.Method]:
    """Every label the script knows: dense, and each selection method under each position policy.

    Selection methods run with their library defaults (16-token blocks, 32 retrieved blocks, a 128-token
    window: ~0.7k attended tokens per query), well inside the 8k trained window under every policy.
    """
    out: dict[str, longattn.Method] = {"dense": longattn.get_method("dense")}
    for name in SELECTORS:
        for policy in POLICIES:
            out[f"{name}/{policy}"] = longattn.get_method(name, positions=policy)
    # Self-Extend itself: every key, a 1,024-token neighbour window at exact distances, the rest grouped by 4
    # (covers 4 x (8,192 - 1,024) = 28k tokens).
    out["dense/self_extend"] = longattn.get_method("dense", window=1024, positions=SelfExtend(group_size=4))
    # Wider exact windows and larger groups (each label: window W, group G; G x (8,192 - W) must cover the prompt).
    for w, g in ((2048, 4), (4096, 4), (1024, 8), (2048, 8), (1024, 16)):
        out[f"dense/self_extend_w{w}_g{g}"] = longattn.get_method("dense", window=w, positions=SelfExtend(group_size=g))
    # Dual Chunk Attention over every key, the paper's sizes for an 8k window (chunks of 6,144 - 512 tokens),
    # and a longer local window.
    out["dense/dca"] = longattn.get_method("dense", positions="dca")
    out["dense/dca_w1024"] = longattn.get_method("dense", positions=DualChunk(chunk_size=6144, local_window=1024))
    out["dense/dca_c7168"] = longattn.get_method("dense", positions=DualChunk(chunk_size=7168, local_window=1024))
    # Sparse retrieval under Self-Extend (G = 8, a 1,024-token exact window, 64 retrieved blocks), with layers
    # whose attention is too spread for the budget run dense (min_layer_mass, the quality issue's mechanism).
    out["moba/self_extend_g8"] = longattn.get_method("moba", window=1024, top_k=64, positions=SelfExtend(group_size=8))
    out["moba/self_extend_g8_layers"] = longattn.get_method("moba", window=1024, top_k=64, min_layer_mass=0.75,
                                                            positions=SelfExtend(group_size=8))
    # The best sparse setting we tried at 16k (still wrong there): moba with a wide budget under Self-Extend.
    out["moba/self_extend_wide"] = longattn.get_method("moba", window=1024, top_k=128,
                                                       positions=SelfExtend(group_size=4))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/extension"))
    parser.add_argument("--labels", default="moba/longheads")
    parser.add_argument("--tasks", default="passkey,niah_single")
    parser.add_argument("--lengths", default="8k,16k,32k")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--haystack", choices=["repeat", "natural"],
                        help="the filler of every task (default: repeat for passkey, natural for niah_single)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    console = Console()
    results = args.out / "results.jsonl"
    if not args.report_only:
        known = configs()
        labels = [x.strip() for x in args.labels.split(",") if x.strip()]
        unknown = [x for x in labels if x not in known]
        if unknown:
            parser.error(f"--labels {unknown} unknown; known: {', '.join(known)}")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if t not in HAYSTACK]
        if bad:
            parser.error(f"--tasks {bad} unknown; known: {', '.join(HAYSTACK)}")
        chosen = {label: known[label] for label in labels}
        depths = [float(d) for d in args.depths.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        console.print(f"torch threads {torch.get_num_threads()}; writing {results}")
        with console.status("loading model"):
            model, tok = longattn.load_model()
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=console)
        with progress:
            # Seed by seed, length by length: a run stopped part-way covers every length with the first seed.
            for seed in seeds:
                for length in parse_lengths(args.lengths):
                    for task in tasks:
                        run_sweep(model, tok, tasks=[task], methods=chosen, lengths=[length], depths=depths,
                                  seeds=[seed], out=results, model_id=DEFAULT_GGUF,
                                  haystacks=[args.haystack or HAYSTACK[task]],
                                  recall_queries=0, progress=progress)
    console.print(f"report: {write_report(results, args.out)}")


if __name__ == "__main__":
    main()
