"""The ``longattn`` command line: ``demo``, ``methods``, ``generate``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training-free block-sparse attention for HF LLMs.")


def _parse_config(pairs: list[str]) -> dict[str, Any]:
    """``["top_k=8", "window=128"]`` -> ``{"top_k": 8, "window": 128}`` (values parsed as JSON when they can be)."""
    config: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            config[key] = json.loads(raw)
        except json.JSONDecodeError:
            config[key] = raw
    return config


@app.command()
def methods() -> None:
    """List the methods with their papers."""
    from longattn.methods import list_methods, method_class

    console = Console()
    table = Table("method", "idea", "paper")
    for column in table.columns:
        column.overflow = "fold"
    for name in list_methods():
        cls = method_class(name)
        # The docstring's first sentence, whatever its line breaks.
        idea = " ".join((cls.__doc__ or "").split()).split(". ")[0].rstrip(".") + "."
        table.add_row(name, idea, cls.paper)
    console.print(table)


@app.command()
def generate(
    prompt_file: Path = typer.Option(..., "--prompt-file", exists=True, dir_okay=False, help="Text file with the prompt."),
    method: str = typer.Option("moba", help="Method name (see `longattn methods`)."),
    set_: list[str] = typer.Option([], "--set", help="Method option as key=value; repeatable."),
    model: Optional[str] = typer.Option(None, help="Local checkpoint directory or .gguf file (default: embedded SmolLM2)."),
    max_new_tokens: int = typer.Option(64, min=1),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
) -> None:
    """Run one greedy generation with a method and print the text, timings and density."""
    import longattn
    from longattn.bench import greedy_generate

    console = Console()
    chosen = longattn.get_method(method, **_parse_config(set_))
    text = prompt_file.read_text()
    with console.status("loading model"):
        lm, tok = longattn.load_model(model)
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with console.status(f"{method}: prefill of {ids.shape[1]} tokens"), longattn.apply(lm, chosen) as session:
        result = greedy_generate(lm, ids, max_new_tokens, tok.eos_token_id)
    console.print(tok.decode(result.tokens, skip_special_tokens=True))
    console.print(
        f"[dim]{method}: {ids.shape[1]} prompt tokens, prefill {result.prefill_s:.2f}s, "
        f"{len(result.tokens)} new tokens in {result.decode_s:.2f}s, "
        f"prefill density {session.prefill_stats.density:.3f}[/dim]"
    )


@app.command()
def demo(
    lengths: str = typer.Option("2048,8192,12288", help="Comma-separated prompt lengths in tokens."),
    samples: int = typer.Option(2, min=1, help="Passkey prompts per length (different keys and depths)."),
    set_: list[str] = typer.Option([], "--set", help="MoBA option as key=value (e.g. top_k=16); repeatable."),
    model: Optional[str] = typer.Option(None, help="Local checkpoint directory or .gguf file (default: embedded SmolLM2)."),
) -> None:
    """Passkey retrieval with dense attention and MoBA on the default model: accuracy, density, prefill time."""
    import torch

    import longattn
    from longattn.bench import greedy_generate
    from longattn.bench.tasks import passkey

    console = Console()
    try:
        sizes = [int(x) for x in lengths.split(",") if x.strip()]
    except ValueError as err:
        raise typer.BadParameter(f"--lengths must be comma-separated integers, got {lengths!r}") from err
    methods_ = {
        "dense": longattn.get_method("dense"),
        "moba": longattn.get_method("moba", **_parse_config(set_)),
    }
    with console.status("loading model"):
        lm, tok = longattn.load_model(model)
    console.print(f"moba: {methods_['moba']}")
    console.print(f"model: {lm.config.model_type}, {lm.config.num_hidden_layers} layers, trained window "
                  f"{lm.config.max_position_embeddings} tokens; torch threads {torch.get_num_threads()}")
    rows: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console,
    )
    with progress:
        task = progress.add_task("passkey", total=len(sizes) * samples * len(methods_))
        for length in sizes:
            for seed in range(samples):
                depth = (seed + 0.5) / samples
                example = passkey.make(tok, length, depth, seed)
                ids = tok(example.prompt, return_tensors="pt").input_ids
                for name, method in methods_.items():
                    progress.update(task, description=f"{name} @ {length} tokens, depth {depth:.2f}")
                    with longattn.apply(lm, method) as session:
                        result = greedy_generate(lm, ids, 8, tok.eos_token_id)
                    answer = tok.decode(result.tokens, skip_special_tokens=True)
                    hit = passkey.score(example, answer)
                    rows.setdefault((name, length), []).append(
                        (hit, session.prefill_stats.density, result.prefill_s)
                    )
                    progress.advance(task)
    table = Table(title=f"passkey retrieval, {samples} prompt(s) per length")
    for col in ("method", "length", "accuracy", "density", "prefill s", "speed-up vs dense"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for length in sizes:
        dense_t = sum(r[2] for r in rows[("dense", length)]) / samples
        for name in methods_:
            cells = rows[(name, length)]
            acc = sum(c[0] for c in cells) / len(cells)
            dens = sum(c[1] for c in cells) / len(cells)
            t = sum(c[2] for c in cells) / len(cells)
            table.add_row(name, str(length), f"{acc:.2f}", f"{dens:.3f}", f"{t:.2f}",
                          f"{dense_t / t:.2f}x" if t > 0 and not math.isnan(t) else "-")
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    app()
