"""The ``longattn`` command line: ``demo``, ``methods``, ``generate``, ``bench``, ``report``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training-free block-sparse attention for HF LLMs.")


def _progress(console: Console) -> Progress:
    """The progress bar of long commands: description, bar, done / total, elapsed, ETA."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console,
    )


def _grid(lengths: str, depths: str) -> tuple[list[int], list[float]]:
    """``"2k,4k"``, ``"0.1,0.5"`` -> token lengths and depths, or a BadParameter naming the problem."""
    from longattn.bench.runner import parse_lengths

    try:
        return parse_lengths(lengths), [float(d) for d in depths.split(",") if d.strip()]
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


def _load(model: Optional[str], device: str, backend: str) -> tuple[Any, Any]:
    """Load the model onto ``device`` ("cpu", or "cuda" in bfloat16), after checking ``device`` and ``backend``."""
    import torch

    import longattn
    from longattn.ops import BACKENDS

    if device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda: no CUDA GPU is visible to torch")
    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    lm, tok = longattn.load_model(model, dtype=torch.bfloat16 if device == "cuda" else None)
    return lm.to(device), tok


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
        # A sentence ends at ". " before a capital letter, not inside code like ``q . mean``.
        idea = re.split(r"\.\s+(?=[A-Z])", " ".join((cls.__doc__ or "").split()))[0].rstrip(".") + "."
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
    device: str = typer.Option("cpu", help="cpu, or cuda (bfloat16; the GPU kernels run there)."),
    backend: str = typer.Option("auto", help="Attention backend: auto, reference, cpu, triton, flex (auto: triton on cuda)."),
) -> None:
    """Run one greedy generation with a method and print the text, timings and density."""
    import longattn
    from longattn.bench import greedy_generate

    console = Console()
    chosen = longattn.get_method(method, **_parse_config(set_))
    text = prompt_file.read_text()
    with console.status("loading model"):
        lm, tok = _load(model, device, backend)
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids.to(device)
    with console.status(f"{method}: prefill of {ids.shape[1]} tokens"), \
            longattn.apply(lm, chosen, backend=backend) as session:
        result = greedy_generate(lm, ids, max_new_tokens, tok.eos_token_id)
    console.print(tok.decode(result.tokens, skip_special_tokens=True))
    console.print(
        f"[dim]{method}: {ids.shape[1]} prompt tokens, prefill {result.prefill_s:.2f}s, "
        f"{len(result.tokens)} new tokens in {result.decode_s:.2f}s, "
        f"prefill density {session.prefill_stats.density:.3f}[/dim]"
    )


# The demo's extension setting: the best combination measured in docs/results/extension.md (Self-Extend over
# every key with a 1,024-token exact window; no sparse selection we tried answered at 16k).
DEMO_METHOD = "dense"
DEMO_POSITIONS = "self_extend"
DEMO_WINDOW = 1024
DEMO_GROUP = 4


@app.command()
def demo(
    lengths: str = typer.Option("4k,8k,16k", help="Comma-separated prompt lengths in tokens (k = 1024)."),
    samples: int = typer.Option(1, min=1, help="Passkey prompts per length (different keys and depths)."),
    method: str = typer.Option(DEMO_METHOD, help="Selection method of the extension setting."),
    positions: str = typer.Option(DEMO_POSITIONS, help="Position policy: original, longheads, infllm, self_extend."),
    group_size: int = typer.Option(DEMO_GROUP, min=1, help="Self-Extend's group size (positions=self_extend)."),
    set_: list[str] = typer.Option([], "--set", help="Method option as key=value (e.g. top_k=16); repeatable."),
    model: Optional[str] = typer.Option(None, help="Local checkpoint directory or .gguf file (default: embedded SmolLM2)."),
) -> None:
    """Passkey retrieval past the trained window: dense attention vs block retrieval with re-encoded positions."""
    import torch

    import longattn
    from longattn.bench import greedy_generate
    from longattn.bench.runner import parse_lengths
    from longattn.bench.tasks import passkey
    from longattn.core.positions import SelfExtend

    console = Console()
    try:
        sizes = parse_lengths(lengths)
        policy: Any = SelfExtend(group_size=group_size) if positions == "self_extend" else positions
        config = {"window": DEMO_WINDOW, **_parse_config(set_)}
        extension = longattn.get_method(method, positions=policy, **config)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    if min(sizes) < 128:
        raise typer.BadParameter(f"--lengths must be at least 128 tokens each, got {lengths!r}")
    label = f"{method} + {positions} positions"
    methods_ = {"dense": longattn.get_method("dense"), label: extension}
    with console.status("loading model"):
        lm, tok = longattn.load_model(model)
    window = lm.config.max_position_embeddings
    console.print(f"model: {lm.config.model_type}, {lm.config.num_hidden_layers} layers, trained window {window} "
                  f"tokens; torch threads {torch.get_num_threads()}")
    console.print(f"{label}: {extension}")
    rows = []
    with _progress(console) as progress:
        task = progress.add_task("passkey", total=len(sizes) * samples * len(methods_))
        for length in sizes:
            for seed in range(samples):
                depth = (seed + 0.5) / samples
                example = passkey.make(tok, length, depth, seed)
                ids = tok(example.prompt, add_special_tokens=False, return_tensors="pt").input_ids
                for name, chosen in methods_.items():
                    progress.update(task, description=f"{name} @ {length} tokens, depth {depth:.2f}")
                    with longattn.apply(lm, chosen) as session:
                        result = greedy_generate(lm, ids, 8, tok.eos_token_id)
                    answer = tok.decode(result.tokens, skip_special_tokens=True).strip()
                    rows.append((name, length, example.answer, answer, passkey.score(example, answer),
                                 session.prefill_stats.density, result.prefill_s))
                    progress.advance(task)
    table = Table(title=f"passkey retrieval; the model was trained on {window} tokens")
    for col in ("method", "length", "key", "answer", "correct", "density", "prefill s"):
        table.add_column(col, justify="left" if col in ("method", "answer") else "right")
    for name, length, key, answer, hit, density, seconds in rows:
        table.add_row(name, str(length), key, answer[:24], "yes" if hit else "no", f"{density:.3f}", f"{seconds:.1f}")
    console.print(table)
    for name in methods_:
        mine = [r for r in rows if r[0] == name]
        console.print(f"{name}: {sum(r[4] for r in mine):.0f}/{len(mine)} correct, "
                      f"{sum(r[6] for r in mine):.0f} s of prefill")


def _method_specs(names: str, settings: list[str]) -> dict[str, Any]:
    """``"dense,moba"`` and ``["moba.top_k=8"]`` -> ``{"dense": Dense(), "moba": MoBA(top_k=8)}``."""
    import longattn

    labels = [n.strip() for n in names.split(",") if n.strip()]
    if not labels or len(set(labels)) != len(labels):
        raise typer.BadParameter(f"--methods must list distinct method names, got {names!r}")
    per: dict[str, list[str]] = {label: [] for label in labels}
    for item in settings:
        target, sep, rest = item.partition(".")
        if not sep or target not in per:
            raise typer.BadParameter(f"--set expects method.key=value with a method from --methods, got {item!r}")
        per[target].append(rest)
    try:
        return {label: longattn.get_method(label, **_parse_config(per[label])) for label in labels}
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(str(err)) from err


@app.command()
def bench(
    task: str = typer.Option("niah_single", help="Comma-separated task names (see longattn.bench.tasks.TASKS)."),
    methods_: str = typer.Option("dense,streaming,moba", "--methods", help="Comma-separated method names."),
    set_: list[str] = typer.Option([], "--set", help="Method option as method.key=value (moba.top_k=8); repeatable."),
    lengths: str = typer.Option("2k,4k,8k", help="Comma-separated prompt lengths in tokens (k = 1024)."),
    depths: str = typer.Option("0.1,0.5,0.9", help="Comma-separated needle depths in [0, 1]."),
    seeds: int = typer.Option(3, min=1, help="Prompts per (length, depth): seeds 0..N-1."),
    haystack: str = typer.Option("repeat", help="Comma-separated haystacks: repeat, natural."),
    recall_queries: int = typer.Option(32, min=0, help="Query rows per layer sampled for attention recall (0: off)."),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="Override each task's answer length."),
    out: Path = typer.Option(Path("results.jsonl"), help="JSONL file to append to; finished cells are skipped."),
    model: Optional[str] = typer.Option(None, help="Local checkpoint directory or .gguf file (default: embedded SmolLM2)."),
    device: str = typer.Option("cpu", help="cpu, or cuda (bfloat16; the GPU kernels run there)."),
    backend: str = typer.Option("auto", help="Attention backend: auto, reference, cpu, triton, flex (auto: triton on cuda)."),
) -> None:
    """Sweep tasks x methods x lengths x depths x seeds on one model; one JSON line per cell (resumable)."""
    from longattn.bench.runner import run_sweep
    from longattn.bench.tasks import TASKS
    from longattn.bench.tasks.haystack import HAYSTACKS
    from longattn.hf import DEFAULT_GGUF

    console = Console()
    tasks = [t.strip() for t in task.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise typer.BadParameter(f"--task: unknown {unknown or task!r}; known tasks: {', '.join(sorted(TASKS))}")
    chosen = _method_specs(methods_, set_)
    sizes, where = _grid(lengths, depths)
    stacks = [h.strip() for h in haystack.split(",") if h.strip()]
    if not stacks or any(h not in HAYSTACKS for h in stacks):
        raise typer.BadParameter(f"--haystack must be repeat and/or natural, got {haystack!r}")
    with console.status("loading model"):
        lm, tok = _load(model, device, backend)
    progress = _progress(console)
    try:
        with progress:
            summary = run_sweep(
                lm, tok, tasks=tasks, methods=chosen, lengths=sizes, depths=where, seeds=list(range(seeds)),
                out=out, model_id=model or DEFAULT_GGUF, haystacks=stacks, recall_queries=recall_queries,
                max_new_tokens=max_new_tokens, progress=progress, backend=backend,
            )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    console.print(f"{summary.ran} cells run, {summary.skipped} already in {out}, {summary.failed} failed")


@app.command()
def report(
    results: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL written by `longattn bench`."),
    out: Path = typer.Option(Path("report"), help="Directory for report.md and the PNG figures."),
) -> None:
    """Markdown tables and PNG figures (heat maps, accuracy vs density, recall per layer) from bench results."""
    from longattn.bench.report import write_report

    console = Console()
    try:
        path = write_report(results, out)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    console.print(f"wrote {path} and {len(list(Path(out).glob('*.png')))} figures")


if __name__ == "__main__":  # pragma: no cover
    app()


heads_app = typer.Typer(no_args_is_help=True, help="Per-head instruments: retrieval heads, streaming heads, sinks.")
app.add_typer(heads_app, name="heads")


@heads_app.command("profile")
def heads_profile(
    out: Path = typer.Option(Path("profile.json"), help="Where to write the HeadProfile JSON."),
    model: Optional[str] = typer.Option(None, help="Local checkpoint directory or .gguf file (default: embedded SmolLM2)."),
    lengths: str = typer.Option("1k,2k,4k", help="Comma-separated prompt lengths in tokens (k = 1024)."),
    depths: str = typer.Option("0.1,0.3,0.5,0.7,0.9", help="Comma-separated needle depths in [0, 1]."),
    seeds: int = typer.Option(1, min=1, help="Prompts per (length, depth): seeds 0..N-1."),
    haystack: str = typer.Option("natural", help="natural or repeat."),
    window: int = typer.Option(256, min=0, help="Local window the streaming score counts (match your duo)."),
    sink_tokens: int = typer.Option(4, min=0, help="Initial tokens the streaming score counts as sinks."),
    plots: Optional[Path] = typer.Option(None, help="Directory for the heat-map PNGs (default: next to --out)."),
) -> None:
    """Profile every head (retrieval score, streaming score, sink map) on needle prompts; save JSON + heat maps."""
    import longattn
    from longattn.analysis.heads import SCORES, profile_heads
    from longattn.hf import DEFAULT_GGUF

    console = Console()
    sizes, where = _grid(lengths, depths)
    with console.status("loading model"):
        lm, tok = longattn.load_model(model)
    progress = _progress(console)
    try:
        with progress:
            profile = profile_heads(
                lm, tok, lengths=sizes, depths=where, seeds=list(range(seeds)), haystack=haystack, window=window,
                sink_tokens=sink_tokens, model_name=model or DEFAULT_GGUF, progress=progress,
            )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    profile.save(out)
    folder = plots or out.parent
    figures = [profile.heatmap(folder / f"{out.stem}_{score}.png", score) for score in SCORES]
    _print_profile(console, profile)
    console.print(f"wrote {out} and {', '.join(str(f) for f in figures)}")


@heads_app.command("show")
def heads_show(profile: Path = typer.Argument(..., help="A HeadProfile JSON file.")) -> None:
    """Summarise a HeadProfile: head classes, the strongest retrieval heads, the commonest hidden sinks."""
    from longattn.analysis.heads import HeadProfile

    try:
        loaded = HeadProfile.load(profile)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err
    _print_profile(Console(), loaded)


def _print_profile(console: Console, profile: Any) -> None:
    import torch

    classes = [c for row in profile.classes for c in row]
    total = len(classes)
    console.print(f"[bold]{profile.model.get('name')}[/]: {profile.num_layers} layers x {profile.num_heads} heads, "
                  f"profiled on {profile.settings.get('prompts')} prompts (accuracy "
                  f"{profile.settings.get('accuracy', float('nan')):.2f})")
    for name in ("retrieval", "streaming", "mixed"):
        count = classes.count(name)
        console.print(f"  {name:9s} {count:4d} heads ({count / max(1, total):.1%})")
    scores = profile.scores()
    top = torch.topk(scores.flatten(), min(10, scores.numel()))
    table = Table("layer", "head", "retrieval", "streaming", title="strongest retrieval heads")
    stream = profile.scores("streaming").flatten()
    for value, flat in zip(top.values.tolist(), top.indices.tolist()):
        table.add_row(str(flat // profile.num_heads), str(flat % profile.num_heads), f"{value:.3f}",
                      f"{float(stream[flat]):.3f}")
    console.print(table)
    counts: dict[str, int] = {}
    for entry in profile.sinks:
        for token in entry["tokens"]:
            counts[token["text"]] = counts.get(token["text"], 0) + token["count"]
    common = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    if common:
        console.print("  commonest hidden sinks: " + ", ".join(f"{t!r} x{c}" for t, c in common))
