"""The ``longattn`` command line: ``demo``, ``methods``, ``generate``, ``bench``, ``report`` and ``heads``.

A user's mistake is a usage error (exit code 2) naming the option, never a traceback: see `longattn.cli.common.usage`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from longattn.cli.common import (
    CONTEXT_PARALLEL_HELP, DTYPE_HELP, LENGTHS_HELP, MODEL_HELP, checked_method, context_parallel, grid, load,
    method_specs, parse_config, progress_bar, usage,
)
from longattn.cli.demo import demo
from longattn.cli.heads import heads_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training-free block-sparse attention for HF LLMs.")


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
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    context_parallel_: bool = typer.Option(False, "--context-parallel", help=CONTEXT_PARALLEL_HELP),
) -> None:
    """Run one greedy generation with a method and print the text, timings and density."""
    import longattn
    from longattn.bench import greedy_generate

    group, rank = context_parallel(context_parallel_, device)
    console = Console(quiet=rank != 0)
    chosen = checked_method(method, **parse_config(set_))
    text = prompt_file.read_text()
    if not text.strip():
        raise typer.BadParameter(f"{str(prompt_file)!r} holds no prompt (it is empty)", param_hint="--prompt-file")
    with console.status("loading model"):
        lm, tok = load(model, device, backend, dtype)
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids.to(device)
    with console.status(f"{method}: prefill of {ids.shape[1]} tokens"), usage("--model", "--method", "--backend"), \
            longattn.apply(lm, chosen, backend=backend, process_group=group) as session:
        result = greedy_generate(lm, ids, max_new_tokens, tok.eos_token_id)
    console.print(tok.decode(result.tokens, skip_special_tokens=True))
    console.print(f"[dim]{method}: {ids.shape[1]} prompt tokens, prefill {result.prefill_s:.2f}s, {len(result.tokens)} "
                  f"new tokens in {result.decode_s:.2f}s, prefill density {session.prefill_stats.density:.3f}[/dim]")


# The demo's extension setting: the best combination measured in docs/results/extension.md (Self-Extend over
# every key with a 1,024-token exact window; no sparse selection we tried answered at 16k).
@app.command()
def bench(
    task: str = typer.Option("niah_single", help="Comma-separated task names (see longattn.bench.tasks.TASKS)."),
    methods_: str = typer.Option("dense,streaming,moba", "--methods", help="Comma-separated method names."),
    set_: list[str] = typer.Option([], "--set", help="Method option as method.key=value (moba.top_k=8); repeatable."),
    lengths: str = typer.Option("2k,4k,8k", help=LENGTHS_HELP),
    depths: str = typer.Option("0.1,0.5,0.9", help="Comma-separated needle depths in [0, 1]."),
    seeds: int = typer.Option(10, min=1, help="Prompts per (length, depth): seeds 0..N-1. The default, 3 depths x 10 "
                              "seeds, gives the 30 prompts per point that a 95% interval needs to rank methods."),
    haystack: str = typer.Option("repeat", help="Comma-separated haystacks: repeat, natural."),
    recall_queries: int = typer.Option(32, min=0, help="Query rows per layer sampled for attention recall (0: off)."),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="Override each task's answer length."),
    out: Path = typer.Option(Path("results.jsonl"), dir_okay=False, help="JSONL to append to; finished cells are skipped."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    device: str = typer.Option("cpu", help="cpu, or cuda (bfloat16; the GPU kernels run there)."),
    backend: str = typer.Option("auto", help="Attention backend, one of longattn.ops.BACKENDS (auto: triton on cuda)."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    context_parallel_: bool = typer.Option(False, "--context-parallel", help=CONTEXT_PARALLEL_HELP + " Needs "
                                           "--recall-queries 0."),
) -> None:
    """Sweep tasks x methods x lengths x depths x seeds on one model; one JSON line per cell (resumable)."""
    from longattn.bench.cells import finished_keys
    from longattn.bench.runner import run_sweep
    from longattn.bench.tasks import TASKS
    from longattn.bench.tasks.haystack import HAYSTACKS
    from longattn.hf import DEFAULT_GGUF

    if context_parallel_ and recall_queries:
        raise typer.BadParameter("attention recall is an observer, which context parallelism does not run: pass "
                                 "--recall-queries 0", param_hint="--context-parallel")
    group, rank = context_parallel(context_parallel_, device)
    console = Console(quiet=rank != 0)
    tasks = [t.strip() for t in task.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise typer.BadParameter(f"unknown {unknown or task!r}; known: {', '.join(sorted(TASKS))}", param_hint="--task")
    chosen = method_specs(methods_, set_)
    sizes, where = grid(lengths, depths)
    stacks = [h.strip() for h in haystack.split(",") if h.strip()]
    if not stacks or any(h not in HAYSTACKS for h in stacks):
        raise typer.BadParameter(f"--haystack must be repeat and/or natural, got {haystack!r}", param_hint="--haystack")
    with usage("--out"):
        finished_keys(out)  # a damaged results file fails now, not after the model has loaded
    with console.status("loading model"):
        lm, tok = load(model, device, backend, dtype)
    with progress_bar(console) as progress, usage("--task", "--lengths", "--haystack", "--out"):
        summary = run_sweep(
            lm, tok, tasks=tasks, methods=chosen, lengths=sizes, depths=where, seeds=list(range(seeds)),
            out=out, model_id=model or DEFAULT_GGUF, haystacks=stacks, recall_queries=recall_queries,
            max_new_tokens=max_new_tokens, progress=progress, backend=backend, process_group=group,
        )
    console.print(f"{summary.ran} cells run, {summary.skipped} already in {out}, {summary.failed} failed")


@app.command()
def report(
    results: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL written by `longattn bench`."),
    out: Path = typer.Option(Path("report"), file_okay=False, help="Directory for report.md and the PNG figures."),
) -> None:
    """Markdown tables and PNG figures (heat maps, accuracy vs density, recall per layer) from bench results."""
    from longattn.bench.report import write_report

    with usage("RESULTS"):  # --out is checked by typer (file_okay=False)
        path = write_report(results, out)
    Console().print(f"wrote {path} and {len(list(Path(out).glob('*.png')))} figures")


app.command()(demo)
app.add_typer(heads_app, name="heads")
