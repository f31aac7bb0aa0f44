"""``longattn demo``: passkey retrieval past the trained window, dense vs re-encoded positions."""

from __future__ import annotations

from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from longattn.cli.common import LENGTHS_HELP, MODEL_HELP, checked_method, grid, load, parse_config, progress_bar

DEMO_METHOD = "dense"
DEMO_POSITIONS = "self_extend"
DEMO_WINDOW = 1024
DEMO_GROUP = 4


def demo(
    lengths: str = typer.Option("4k,8k,16k", help=LENGTHS_HELP),
    samples: int = typer.Option(1, min=1, help="Passkey prompts per length (different keys and depths)."),
    method: str = typer.Option(DEMO_METHOD, help="Selection method of the extension setting."),
    positions: str = typer.Option(DEMO_POSITIONS, help="Position policy: original, longheads, infllm, self_extend."),
    group_size: int = typer.Option(DEMO_GROUP, min=1, help="Self-Extend's group size (positions=self_extend)."),
    set_: list[str] = typer.Option([], "--set", help="Method option as key=value (e.g. top_k=16); repeatable."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
) -> None:
    """Passkey retrieval past the trained window: dense attention vs block retrieval with re-encoded positions."""
    import torch

    import longattn
    from longattn.bench.runner import run_sweep
    from longattn.core.positions import SelfExtend
    from longattn.hf import DEFAULT_GGUF

    console = Console()
    sizes, _ = grid(lengths, "0.5")
    policy: Any = SelfExtend(group_size=group_size) if positions == "self_extend" else positions
    checked_method(method, "--method", "--positions", positions=policy)
    extension = checked_method(method, positions=policy, **{"window": DEMO_WINDOW, **parse_config(set_)})
    label = f"{method} + {positions} positions"
    with console.status("loading model"):
        lm, tok = load(model)
    window = lm.config.max_position_embeddings
    console.print(f"model: {lm.config.model_type}, {lm.config.num_hidden_layers} layers, trained window {window} "
                  f"tokens; torch threads {torch.get_num_threads()}")
    console.print(f"{label}: {extension}")
    with progress_bar(console) as progress:
        # One prompt per seed, its needle at depth (seed + 0.5) / samples: the seeds spread over the context.
        summary = run_sweep(
            lm, tok, tasks=["passkey"], methods={"dense": longattn.get_method("dense"), label: extension},
            lengths=sizes, depths=[(s + 0.5) / samples for s in range(samples)], seeds=list(range(samples)),
            paired=True, out=None, model_id=model or DEFAULT_GGUF, recall_queries=0, max_new_tokens=8,
            progress=progress,
        )
    table = Table(title=f"passkey retrieval; the model was trained on {window} tokens")
    for col in ("method", "length", "key", "answer", "correct", "density", "prefill s"):
        table.add_column(col, justify="left" if col in ("method", "answer") else "right")
    for r in summary.records:
        answer = (r["prediction"] or "").strip() if r["error"] is None else f"error: {r['error']}"
        table.add_row(r["label"], str(r["length"]), r["answer"] or "—", answer[:24], "yes" if r["score"] else "no",
                      *("—" if v is None else f"{v:.{d}f}" for v, d in ((r["density"], 3), (r["prefill_s"], 1))))
    console.print(table)
    for name in ("dense", label):
        mine = [r for r in summary.records if r["label"] == name]
        console.print(f"{name}: {sum(r['score'] or 0 for r in mine):.0f}/{len(mine)} correct, "
                      f"{sum(r['prefill_s'] or 0 for r in mine):.0f} s of prefill")
