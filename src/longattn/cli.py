"""The ``longattn`` command line: ``demo``, ``methods``, ``generate``, ``bench``, ``report`` and ``heads``.

A user's mistake is a usage error (exit code 2) naming the option, never a traceback: see `_usage`."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training-free block-sparse attention for HF LLMs.")
MODEL_HELP = "Local checkpoint directory or .gguf file (default: embedded SmolLM2)."
LENGTHS_HELP = "Comma-separated prompt lengths in tokens (k = 1024)."


@contextmanager
def _usage(*options: str, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turn a ValueError (or one of ``also``) raised in the block into a usage error naming ``options``."""
    try:
        yield
    except (ValueError, *also) as err:
        raise typer.BadParameter(str(err), param_hint=list(options) if len(options) > 1 else options[0]) from err


def _progress(console: Console) -> Progress:
    """The progress bar of long commands: description, bar, done / total, elapsed, ETA."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console)


def _grid(lengths: str, depths: str) -> tuple[list[int], list[float]]:
    """``"2k,4k"``, ``"0.1,0.5"`` -> token lengths (each >= the tasks' minimum) and depths in [0, 1]."""
    from longattn.bench.runner import parse_lengths
    from longattn.bench.tasks.haystack import MIN_LENGTH

    with _usage("--lengths"):
        sizes = parse_lengths(lengths)
        if min(sizes) < MIN_LENGTH:
            raise ValueError(f"lengths must be at least {MIN_LENGTH} tokens each, got {lengths!r}")
    with _usage("--depths"):
        where = [float(d) for d in depths.split(",") if d.strip()]
        if not where or not all(0.0 <= d <= 1.0 for d in where):
            raise ValueError(f"depths must be comma-separated numbers in [0, 1], got {depths!r}")
    return sizes, where


def _load(model: Optional[str], device: str = "cpu", backend: str = "auto") -> tuple[Any, Any]:
    """Load the model onto ``device`` ("cpu", or "cuda" in bfloat16), after checking ``device`` and ``backend``."""
    import torch

    import longattn
    from longattn.ops import check_backend

    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        why = "cuda: no CUDA GPU is visible to torch" if device == "cuda" else f"must be cpu or cuda, got {device!r}"
        raise typer.BadParameter(f"--device {why}", param_hint="--device")
    with _usage("--backend"):
        check_backend(backend)
    with _usage("--model", also=(OSError,)):
        lm, tok = longattn.load_model(model, dtype=torch.bfloat16 if device == "cuda" else None)
    return lm.to(device), tok


def _parse_config(pairs: list[str]) -> dict[str, Any]:
    """``["top_k=8", "window=128"]`` -> ``{"top_k": 8, "window": 128}`` (values parsed as JSON when they can be)."""
    config: dict[str, Any] = {}
    for key, sep, raw in (pair.partition("=") for pair in pairs):
        if not sep:
            raise typer.BadParameter(f"--set expects key=value, got {key!r}", param_hint="--set")
        try:
            config[key] = json.loads(raw)
        except json.JSONDecodeError:
            config[key] = raw
    return config


def _method(name: str, name_option: str = "--method", config_option: str = "--set", /, **config: Any) -> Any:
    """``get_method(name, **config)``; an unknown name is an error of ``name_option``, a bad config of ``config_option``."""
    import longattn
    from longattn.methods import list_methods

    with _usage(config_option if name in list_methods() else name_option):
        return longattn.get_method(name, **config)


@app.command()
def methods() -> None:
    """List the methods with their papers."""
    from longattn.methods import list_methods, method_class

    console = Console()
    table = Table(*(Column(header, overflow="fold") for header in ("method", "idea", "paper")))
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
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    max_new_tokens: int = typer.Option(64, min=1),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
    device: str = typer.Option("cpu", help="cpu, or cuda (bfloat16; the GPU kernels run there)."),
    backend: str = typer.Option("auto", help="Attention backend, one of longattn.ops.BACKENDS (auto: triton on cuda)."),
) -> None:
    """Run one greedy generation with a method and print the text, timings and density."""
    import longattn
    from longattn.bench import greedy_generate

    console = Console()
    chosen = _method(method, **_parse_config(set_))
    text = prompt_file.read_text()
    if not text.strip():
        raise typer.BadParameter(f"{str(prompt_file)!r} holds no prompt (it is empty)", param_hint="--prompt-file")
    with console.status("loading model"):
        lm, tok = _load(model, device, backend)
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids.to(device)
    with console.status(f"{method}: prefill of {ids.shape[1]} tokens"), _usage("--model", "--method", "--backend"), \
            longattn.apply(lm, chosen, backend=backend) as session:
        result = greedy_generate(lm, ids, max_new_tokens, tok.eos_token_id)
    console.print(tok.decode(result.tokens, skip_special_tokens=True))
    console.print(f"[dim]{method}: {ids.shape[1]} prompt tokens, prefill {result.prefill_s:.2f}s, {len(result.tokens)} "
                  f"new tokens in {result.decode_s:.2f}s, prefill density {session.prefill_stats.density:.3f}[/dim]")


# The demo's extension setting: the best combination measured in docs/results/extension.md (Self-Extend over
# every key with a 1,024-token exact window; no sparse selection we tried answered at 16k).
DEMO_METHOD = "dense"
DEMO_POSITIONS = "self_extend"
DEMO_WINDOW = 1024
DEMO_GROUP = 4


@app.command()
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
    sizes, _ = _grid(lengths, "0.5")
    policy: Any = SelfExtend(group_size=group_size) if positions == "self_extend" else positions
    _method(method, "--method", "--positions", positions=policy)
    extension = _method(method, positions=policy, **{"window": DEMO_WINDOW, **_parse_config(set_)})
    label = f"{method} + {positions} positions"
    with console.status("loading model"):
        lm, tok = _load(model)
    window = lm.config.max_position_embeddings
    console.print(f"model: {lm.config.model_type}, {lm.config.num_hidden_layers} layers, trained window {window} "
                  f"tokens; torch threads {torch.get_num_threads()}")
    console.print(f"{label}: {extension}")
    with _progress(console) as progress:
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


def _method_specs(names: str, settings: list[str]) -> dict[str, Any]:
    """``"dense,moba"`` and ``["moba.top_k=8"]`` -> ``{"dense": Dense(), "moba": MoBA(top_k=8)}``."""
    labels = [n.strip() for n in names.split(",") if n.strip()]
    if not labels or len(set(labels)) != len(labels):
        raise typer.BadParameter(f"--methods must list distinct method names, got {names!r}", param_hint="--methods")
    per: dict[str, list[str]] = {label: [] for label in labels}
    for item in settings:
        target, sep, rest = item.partition(".")
        if not sep or target not in per:
            raise typer.BadParameter(f"expects method.key=value naming one of --methods, got {item!r}", param_hint="--set")
        per[target].append(rest)
    return {label: _method(label, "--methods", "--set", **_parse_config(per[label])) for label in labels}


@app.command()
def bench(
    task: str = typer.Option("niah_single", help="Comma-separated task names (see longattn.bench.tasks.TASKS)."),
    methods_: str = typer.Option("dense,streaming,moba", "--methods", help="Comma-separated method names."),
    set_: list[str] = typer.Option([], "--set", help="Method option as method.key=value (moba.top_k=8); repeatable."),
    lengths: str = typer.Option("2k,4k,8k", help=LENGTHS_HELP),
    depths: str = typer.Option("0.1,0.5,0.9", help="Comma-separated needle depths in [0, 1]."),
    seeds: int = typer.Option(3, min=1, help="Prompts per (length, depth): seeds 0..N-1."),
    haystack: str = typer.Option("repeat", help="Comma-separated haystacks: repeat, natural."),
    recall_queries: int = typer.Option(32, min=0, help="Query rows per layer sampled for attention recall (0: off)."),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="Override each task's answer length."),
    out: Path = typer.Option(Path("results.jsonl"), dir_okay=False, help="JSONL to append to; finished cells are skipped."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    device: str = typer.Option("cpu", help="cpu, or cuda (bfloat16; the GPU kernels run there)."),
    backend: str = typer.Option("auto", help="Attention backend, one of longattn.ops.BACKENDS (auto: triton on cuda)."),
) -> None:
    """Sweep tasks x methods x lengths x depths x seeds on one model; one JSON line per cell (resumable)."""
    from longattn.bench.runner import finished_keys, run_sweep
    from longattn.bench.tasks import TASKS
    from longattn.bench.tasks.haystack import HAYSTACKS
    from longattn.hf import DEFAULT_GGUF

    console = Console()
    tasks = [t.strip() for t in task.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise typer.BadParameter(f"unknown {unknown or task!r}; known: {', '.join(sorted(TASKS))}", param_hint="--task")
    chosen = _method_specs(methods_, set_)
    sizes, where = _grid(lengths, depths)
    stacks = [h.strip() for h in haystack.split(",") if h.strip()]
    if not stacks or any(h not in HAYSTACKS for h in stacks):
        raise typer.BadParameter(f"--haystack must be repeat and/or natural, got {haystack!r}", param_hint="--haystack")
    with _usage("--out"):
        finished_keys(out)  # a damaged results file fails now, not after the model has loaded
    with console.status("loading model"):
        lm, tok = _load(model, device, backend)
    with _progress(console) as progress, _usage("--task", "--lengths", "--haystack", "--out"):
        summary = run_sweep(
            lm, tok, tasks=tasks, methods=chosen, lengths=sizes, depths=where, seeds=list(range(seeds)),
            out=out, model_id=model or DEFAULT_GGUF, haystacks=stacks, recall_queries=recall_queries,
            max_new_tokens=max_new_tokens, progress=progress, backend=backend,
        )
    console.print(f"{summary.ran} cells run, {summary.skipped} already in {out}, {summary.failed} failed")


@app.command()
def report(
    results: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL written by `longattn bench`."),
    out: Path = typer.Option(Path("report"), file_okay=False, help="Directory for report.md and the PNG figures."),
) -> None:
    """Markdown tables and PNG figures (heat maps, accuracy vs density, recall per layer) from bench results."""
    from longattn.bench.report import write_report

    with _usage("RESULTS"):  # --out is checked by typer (file_okay=False)
        path = write_report(results, out)
    Console().print(f"wrote {path} and {len(list(Path(out).glob('*.png')))} figures")


heads_app = typer.Typer(no_args_is_help=True, help="Per-head instruments: retrieval heads, streaming heads, sinks.")
app.add_typer(heads_app, name="heads")


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
    sizes, where = _grid(lengths, depths)
    with console.status("loading model"):
        lm, tok = _load(model)
    with _progress(console) as progress, _usage("--haystack", "--model"):
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

    with _usage("PROFILE", also=(FileNotFoundError,)):
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


if __name__ == "__main__":  # pragma: no cover
    app()
