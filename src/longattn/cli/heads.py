"""``longattn heads``: profile every head of a model (retrieval, streaming, sinks) and show a profile."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from longattn.cli.common import LENGTHS_HELP, MODEL_HELP, grid, load, progress_bar, usage

heads_app = typer.Typer(no_args_is_help=True, help="Per-head instruments: retrieval heads, streaming heads, sinks.")


@heads_app.command("profile")
def heads_profile(
    out: Path = typer.Option(Path("profile.json"), help="Where to write the HeadProfile JSON."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    lengths: str = typer.Option("1k,2k,4k", help=LENGTHS_HELP),
    depths: str = typer.Option("0.1,0.3,0.5,0.7,0.9", help="Comma-separated needle depths in [0, 1]."),
    seeds: int = typer.Option(1, min=1, help="Prompts per (length, depth): seeds 0..N-1."),
    haystack: str = typer.Option("natural", help="natural or repeat."),
    window: int = typer.Option(256, min=0, help="Local window the streaming score counts (match your duo)."),
    sink_tokens: int = typer.Option(4, min=0, help="Initial tokens the streaming score counts as sinks."),
    plots: Optional[Path] = typer.Option(None, help="Directory for the heat-map PNGs (default: next to --out)."),
) -> None:
    """Profile every head (retrieval score, streaming score, sink map) on needle prompts; save JSON + heat maps."""
    from longattn.bench.figures import profile_heatmap
    from longattn.bench.profiling import profile_heads
    from longattn.core.profile import SCORES
    from longattn.hf import DEFAULT_GGUF

    console = Console()
    sizes, where = grid(lengths, depths)
    with console.status("loading model"):
        lm, tok = load(model)
    with progress_bar(console) as progress, usage("--haystack", "--model"):
        profile = profile_heads(
            lm, tok, lengths=sizes, depths=where, seeds=list(range(seeds)), haystack=haystack, window=window,
            sink_tokens=sink_tokens, model_name=model or DEFAULT_GGUF, progress=progress,
        )
    profile.save(out)
    figures = [profile_heatmap(profile, (plots or out.parent) / f"{out.stem}_{score}.png", score) for score in SCORES]
    _print_profile(console, profile)
    console.print(f"wrote {out} and {', '.join(str(f) for f in figures)}")


@heads_app.command("show")
def heads_show(profile: Path = typer.Argument(..., help="A HeadProfile JSON file.")) -> None:
    """Summarise a HeadProfile: head classes, the strongest retrieval heads, the commonest hidden sinks."""
    from longattn.core.profile import HeadProfile

    with usage("PROFILE", also=(FileNotFoundError,)):
        loaded = HeadProfile.load(profile)
    _print_profile(Console(), loaded)


def _print_profile(console: Console, profile: Any) -> None:
    import torch

    classes = Counter(c for row in profile.classes for c in row)
    total = sum(classes.values())
    console.print(f"[bold]{profile.model.get('name')}[/]: {profile.num_layers} layers x {profile.num_heads} heads, "
                  f"profiled on {profile.settings.get('prompts')} prompts (accuracy "
                  f"{profile.settings.get('accuracy', float('nan')):.2f})")
    for name in ("retrieval", "streaming", "mixed"):
        console.print(f"  {name:9s} {classes[name]:4d} heads ({classes[name] / max(1, total):.1%})")
    scores = profile.scores()
    top = torch.topk(scores.flatten(), min(10, scores.numel()))
    table = Table("layer", "head", "retrieval", "streaming", title="strongest retrieval heads")
    stream = profile.scores("streaming").flatten()
    for value, flat in zip(top.values.tolist(), top.indices.tolist()):
        table.add_row(str(flat // profile.num_heads), str(flat % profile.num_heads), f"{value:.3f}",
                      f"{float(stream[flat]):.3f}")
    console.print(table)
    counts: Counter[str] = Counter()
    for token in (token for entry in profile.sinks for token in entry["tokens"]):
        counts[token["text"]] += token["count"]
    if common := counts.most_common(8):
        console.print("  commonest hidden sinks: " + ", ".join(f"{t!r} x{c}" for t, c in common))
