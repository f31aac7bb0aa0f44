"""``longattn demo``: the headline, dense attention vs the default sparse method at growing lengths (answer,
density, prefill time, speed-up); ``longattn demo --extension``: passkey retrieval past the trained window,
dense vs re-encoded positions."""

from __future__ import annotations

from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from longattn.cli.common import LENGTHS_HELP, MODEL_HELP, checked_method, grid, load, parse_config, progress_bar

DEMO_METHOD = "moba"  # the headline: the default scored method
EXTENSION_METHOD = "dense"
DEMO_POSITIONS = "self_extend"
DEMO_WINDOW = 1024
DEMO_GROUP = 4


def demo(
    lengths: Optional[str] = typer.Option(None, help=LENGTHS_HELP + " Default: 2k,4k,8k; 4k,8k,16k with --extension."),
    samples: int = typer.Option(1, min=1, help="Passkey prompts per length (different keys and depths)."),
    extension: bool = typer.Option(False, "--extension", help="Past the trained window: positions re-encoded."),
    method: Optional[str] = typer.Option(None, help=f"Method against dense (default {DEMO_METHOD}; "
                                                     f"{EXTENSION_METHOD} with --extension)."),
    positions: str = typer.Option(DEMO_POSITIONS, help="--extension: original, longheads, infllm, self_extend, dca."),
    group_size: int = typer.Option(DEMO_GROUP, min=1, help="--extension: Self-Extend's group size."),
    set_: list[str] = typer.Option([], "--set", help="Method option as key=value (e.g. top_k=16); repeatable."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
) -> None:
    """Passkey retrieval, dense attention against a sparse method: its answers, density, prefill time and
    speed-up at growing lengths (``--extension``: past the trained window, with re-encoded positions)."""
    import torch

    import longattn
    from longattn.bench.runner import run_sweep
    from longattn.core.positions import SelfExtend
    from longattn.hf import DEFAULT_GGUF

    console = Console()
    sizes, _ = grid(lengths or ("4k,8k,16k" if extension else "2k,4k,8k"), "0.5")
    name = method or (EXTENSION_METHOD if extension else DEMO_METHOD)
    if extension:
        policy: Any = SelfExtend(group_size=group_size) if positions == "self_extend" else positions
        checked_method(name, "--method", "--positions", positions=policy)
        other = checked_method(name, positions=policy, **{"window": DEMO_WINDOW, **parse_config(set_)})
        label = f"{name} + {positions} positions"
    else:
        for option, value, default in (("--positions", positions, DEMO_POSITIONS), ("--group-size", group_size, DEMO_GROUP)):
            if value != default:
                raise typer.BadParameter("applies to the extension demo only: add --extension", param_hint=option)
        other, label = checked_method(name, **parse_config(set_)), name
    with console.status("loading model"):
        lm, tok = load(model)
    window = lm.config.max_position_embeddings
    console.print(f"model: {lm.config.model_type}, {lm.config.num_hidden_layers} layers, trained window {window} "
                  f"tokens; torch threads {torch.get_num_threads()}")
    console.print(f"{label}: {other}")
    with progress_bar(console) as progress:
        # One prompt per seed, its needle at depth (seed + 0.5) / samples: the seeds spread over the context.
        summary = run_sweep(
            lm, tok, tasks=["passkey"], methods={"dense": longattn.get_method("dense"), label: other},
            lengths=sizes, depths=[(s + 0.5) / samples for s in range(samples)], seeds=list(range(samples)),
            paired=True, out=None, model_id=model or DEFAULT_GGUF, recall_queries=0, max_new_tokens=8,
            progress=progress,
        )
    _print(console, summary.records, label, window, extension)


def _print(console: Console, records: list[dict], label: str, window: int, extension: bool) -> None:
    """The table of cells (speed-up: dense's prefill time over the method's, on the same prompt) and a summary."""
    dense = {(r["length"], r["seed"]): r["prefill_s"] for r in records if r["label"] == "dense"}
    title = f"passkey retrieval; the model was trained on {window} tokens"
    table = Table(title=title if extension else title + "; speed-up = dense prefill s / method prefill s")
    for col in ("method", "length", "key", "answer", "correct", "density", "prefill s", "speed-up"):
        table.add_column(col, justify="left" if col in ("method", "answer") else "right")
    for r in records:
        answer = (r["prediction"] or "").strip() if r["error"] is None else f"error: {r['error']}"
        base = dense.get((r["length"], r["seed"]))
        speed = f"{base / r['prefill_s']:.2f}x" if base and r["prefill_s"] else "—"
        table.add_row(r["label"], str(r["length"]), r["answer"] or "—", answer[:24], "yes" if r["score"] else "no",
                      *("—" if v is None else f"{v:.{d}f}" for v, d in ((r["density"], 3), (r["prefill_s"], 1))), speed)
    console.print(table)
    for name in ("dense", label):
        mine = [r for r in records if r["label"] == name]
        console.print(f"{name}: {sum(r['score'] or 0 for r in mine):.0f}/{len(mine)} correct, "
                      f"{sum(r['prefill_s'] or 0 for r in mine):.0f} s of prefill")
    if not extension:
        console.print("Past the trained window: `longattn demo --extension` (passkey at 4k-16k, dense vs Self-Extend "
                      "positions; about 3.5 minutes on 2 CPU cores).")
