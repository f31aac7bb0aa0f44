"""The benchmark runner: sweep tasks x methods x lengths x depths x seeds on one model, one JSON line per cell.

Every cell is appended (and flushed) as soon as it finishes, so an interrupted sweep loses at most the cell in
flight, and a re-run with the same arguments skips every cell already in the file. A method that fails on a
cell records the error in that cell's line and the sweep goes on.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from longattn.analysis.recall import RecallRecorder
from longattn.bench.cells import _jsonable, cell_key, finished_keys, hardware, method_config, versions
from longattn.bench.generate import greedy_generate
from longattn.bench.memory import PeakMemory
from longattn.bench.tasks import TASKS, Example
from longattn.bench.tasks.haystack import HAYSTACKS
from longattn.hf import apply
from longattn.ops.block_sparse import check_backend
from longattn.methods.base import Method

SCHEMA = 1
# Logits of the perplexity task are computed this many positions at a time: a whole 32k x 49k-vocab logit
# matrix would be 6 GB.
_NLL_CHUNK = 1024
_NLL_BUCKETS = 8


# Every line carries every field, so a failed cell reads like the others with nulls where nothing was measured.
_EMPTY: dict[str, Any] = dict.fromkeys((
    "tokens", "answer", "prediction", "score", "first", "nll", "density", "recall", "recall_s", "prefill_s",
    "decode_s", "decode_tokens", "peak_mem_bytes", "mem_delta_bytes", "mem_kind", "kl_first",
))


@dataclass(frozen=True)
class SweepSummary:
    """What a sweep did: cells run now, cells found finished in the file, and cells whose method failed.

    ``records`` holds the lines of the cells run now (in the order run), as written to the file.
    """

    ran: int
    skipped: int
    failed: int
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)


def _encode(tokenizer: Any, text: str, device: torch.device) -> Tensor:
    # Tasks count their length without special tokens; the model must see exactly the counted tokens.
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)


def _haystacks(task: ModuleType) -> tuple[str, ...]:
    """The haystacks a task can build: its own ``HAYSTACKS``, else every one."""
    return getattr(task, "HAYSTACKS", HAYSTACKS)


@torch.inference_mode()
def token_nll(model: Any, input_ids: Tensor) -> Tensor:
    """Negative log-likelihood of every token given all tokens before it.

    Args:
        input_ids: ``[1, T]``.

    Returns:
        ``[T - 1]`` float32: entry ``t`` is ``-log p(token[t + 1] | tokens[: t + 1])``.
    """
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state  # [1, T, H]
    head = model.get_output_embeddings()
    out = []
    for start in range(0, input_ids.shape[1] - 1, _NLL_CHUNK):
        end = min(start + _NLL_CHUNK, input_ids.shape[1] - 1)
        logits = head(hidden[:, start:end]).float()
        target = input_ids[:, start + 1 : end + 1]
        out.append(torch.nn.functional.cross_entropy(logits[0], target[0], reduction="none"))
    return torch.cat(out)


def _nll_record(nll: Tensor, eval_tokens: int) -> dict[str, Any]:
    n = nll.numel()
    edges = [round(i * n / _NLL_BUCKETS) for i in range(_NLL_BUCKETS + 1)]
    buckets = [{"start": a, "end": b, "nll": float(nll[a:b].mean()), "tokens": b - a}
               for a, b in zip(edges, edges[1:]) if b > a]
    return {"mean": float(nll[-eval_tokens:].mean()), "eval_tokens": eval_tokens, "buckets": buckets}


def run_cell(model: Any, tokenizer: Any, task: ModuleType, example: Example, method: Method,
             recall_queries: int, max_new_tokens: int, backend: str = "auto",
             process_group: Any = None) -> dict[str, Any]:
    """Run one method on one example (attention on ``backend``; context parallel over ``process_group``, every rank
    running the same cell); returns the measured fields of the cell's record (memory: this rank's)."""
    device = next(model.parameters()).device
    ids = _encode(tokenizer, example.prompt, device)
    recorder = RecallRecorder(recall_queries) if recall_queries > 0 else None
    kind = getattr(task, "KIND", "generate")
    rec: dict[str, Any] = {"prediction": None, "score": None, "first": None, "nll": None}
    with PeakMemory(device) as mem, apply(model, method, backend=backend, observer=recorder,
                                          process_group=process_group) as session:
        if kind == "nll":
            start = time.perf_counter()
            nll = token_nll(model, ids)
            measuring = recorder.seconds if recorder is not None else 0.0
            rec.update(prefill_s=time.perf_counter() - start - measuring, decode_s=0.0, decode_tokens=0,
                       recall_s=measuring)
            rec["nll"] = _nll_record(nll, int(example.meta["eval_tokens"]))
        else:
            result = greedy_generate(model, ids, max_new_tokens, tokenizer.eos_token_id)
            measuring = recorder.seconds if recorder is not None else 0.0
            text = tokenizer.decode(result.tokens, skip_special_tokens=True)
            # The recall measurement runs inside the prefill's attention calls; its time is not the method's.
            rec.update(prefill_s=result.prefill_s - measuring, decode_s=result.decode_s,
                       decode_tokens=len(result.tokens) - 1, recall_s=measuring)
            rec["_first_logprobs"] = result.first_logprobs
            if kind == "followup":
                # Continue the same conversation: the cache holds the prompt and the answer but its last token.
                tail = result.tokens[-1:]
                if tokenizer.eos_token_id is not None and int(tail) == tokenizer.eos_token_id:
                    tail = tail[:0]
                follow = torch.cat([tail.view(1, -1), _encode(tokenizer, example.meta["followup"]["prompt"], device)], 1)
                second = greedy_generate(model, follow, max_new_tokens, tokenizer.eos_token_id, result.cache)
                answer2 = tokenizer.decode(second.tokens, skip_special_tokens=True)
                rec["first"] = {"prediction": text, "answer": example.answer, "score": task.score(example, text)}
                rec.update(prediction=answer2, score=task.score_followup(example, answer2))
                again = recorder.seconds - measuring if recorder is not None else 0.0
                rec["followup_prefill_s"] = second.prefill_s - again
            else:
                rec.update(prediction=text, score=task.score(example, text))
    rec["density"] = nan_to_none(session.prefill_stats.density)
    rec["recall"] = recorder.summary() if recorder is not None else None
    rec.update(peak_mem_bytes=mem.peak_bytes, mem_delta_bytes=mem.peak_bytes - mem.start_bytes, mem_kind=mem.kind)
    return rec


def run_sweep(
    model: Any,
    tokenizer: Any,
    *,
    tasks: Sequence[str],
    methods: Mapping[str, Method],
    lengths: Sequence[int],
    depths: Sequence[float],
    seeds: Sequence[int],
    out: str | Path | None,
    model_id: str,
    haystacks: Sequence[str] = ("repeat",),
    recall_queries: int = 32,
    max_new_tokens: int | None = None,
    progress: Any = None,
    backend: str = "auto",
    paired: bool = False,
    process_group: Any = None,
) -> SweepSummary:
    """Sweep the grid and append one JSON line per cell to ``out``; cells already there are skipped.

    Args:
        tasks: task names from :data:`longattn.bench.tasks.TASKS`.
        methods: display label -> method (the label tells two configs of one method apart).
        lengths: prompt lengths in tokens; depths: needle depths in [0, 1]; seeds: prompt seeds.
        out: the JSONL file to append to (created with its folders), or None to keep the records in memory only
            (returned in :attr:`SweepSummary.records`; nothing is skipped).
        model_id: the model's name in every record and cell key.
        haystacks: "repeat" and/or "natural"; a task that lacks one is not run with it.
        recall_queries: query rows sampled per layer for attention recall (0 turns recall off).
        max_new_tokens: tokens to generate (default: each task's ``MAX_NEW_TOKENS``).
        progress: a ``rich.progress.Progress`` to report to (None: silent).
        backend: the attention backend every cell runs on (see :data:`longattn.ops.BACKENDS`).
        paired: run the i-th seed at the i-th depth only (``depths`` and ``seeds`` of equal length), not every
            depth with every seed.
        process_group: a ``torch.distributed`` group to run every cell context parallel over (every rank calls
            ``run_sweep`` with the same arguments; rank 0 writes ``out``). Needs ``recall_queries=0``.
    """
    check_backend(backend)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks {unknown} are unknown; known tasks: {', '.join(sorted(TASKS))}")
    if not methods:
        raise ValueError("methods must name at least one method")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depths must lie in [0, 1], got {depth}")
    for length in lengths:
        if not isinstance(length, int) or length < 128:
            raise ValueError(f"lengths must be integers >= 128, got {length!r}")
    for name in tasks:
        allowed = _haystacks(TASKS[name])
        if not set(allowed) & set(haystacks):
            raise ValueError(f"task {name!r} has no haystack among {list(haystacks)}; it supports {list(allowed)}")
    if recall_queries < 0:
        raise ValueError(f"recall_queries must be >= 0, got {recall_queries}")
    if paired and len(depths) != len(seeds):
        raise ValueError(f"paired depths and seeds must be as many, got {len(depths)} depths and {len(seeds)} seeds")
    if out is not None and Path(out).is_dir():
        raise ValueError(f"out={str(out)!r} is a directory; name the JSONL file to append results to")
    if process_group is not None and recall_queries:
        raise ValueError(f"recall_queries={recall_queries}: attention recall is an observer, which context "
                         "parallelism does not run; pass recall_queries=0 with process_group")
    writer = process_group is None or torch.distributed.get_rank(process_group) == 0
    done = finished_keys(Path(out)) if out is not None else set()
    if process_group is not None:
        torch.distributed.barrier(process_group)  # every rank has read what is done before rank 0 appends
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    configs = {label: method_config(m) for label, m in methods.items()}
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    context = {"model": model_id, "hardware": hardware(), "versions": versions(), "backend": backend, "dtype": dtype}
    # float32 cells keep the key they had before the dtype was recorded, so old result files still resume.
    key_model = model_id if dtype == "float32" else f"{model_id} ({dtype})"
    if process_group is not None:  # a context-parallel cell is its own cell; the ranks go with the hardware
        world = torch.distributed.get_world_size(process_group)
        key_model += f" [context parallel x{world}]"
        context["hardware"] = {**context["hardware"], "context_parallel_ranks": world}

    grid = []
    for name in tasks:
        task = TASKS[name]
        if getattr(task, "KIND", "generate") == "nll":
            points: list[tuple[float | None, int]] = [(None, s) for s in seeds]
        else:
            points = list(zip(depths, seeds)) if paired else [(d, s) for d in depths for s in seeds]
        for haystack in haystacks:
            if haystack in _haystacks(task):
                grid += [(name, haystack, n, d, s) for n in lengths for d, s in points]
    total = len(grid) * len(methods)
    bar = progress.add_task("bench", total=total) if progress is not None else None
    ran = skipped = failed = 0
    records: list[dict[str, Any]] = []
    with Path(out).open("a") if out is not None and writer else nullcontext() as sink:
        for name, haystack, length, depth, seed in grid:
            task = TASKS[name]
            keys = {label: cell_key(name, haystack, label, configs[label], key_model, length, depth, seed)
                    for label in methods}
            todo = [label for label in methods if keys[label] not in done]
            skipped += len(methods) - len(todo)
            if bar is not None:
                progress.advance(bar, len(methods) - len(todo))
            if not todo:
                continue
            example, make_error = None, None
            try:
                example = task.make(tokenizer, length, 0.0 if depth is None else depth, seed, haystack=haystack)
            except Exception as err:  # a task that cannot build this cell is recorded, the sweep goes on
                make_error = f"{type(err).__name__}: {err}"
            # Dense first: its answer-position distribution is what every other method's is compared with.
            todo.sort(key=lambda label: methods[label].name != "dense")
            reference: Tensor | None = None
            for label in todo:
                if bar is not None:
                    where = "" if depth is None else f" depth {depth:g}"
                    progress.update(bar, description=f"{name}/{haystack} {label} @ {length}{where} seed {seed}")
                record = {"schema": SCHEMA, "key": keys[label], "task": name, "haystack": haystack,
                          "method": methods[label].name, "label": label, "config": configs[label], **context,
                          "length": length, "depth": depth, "seed": seed, **_EMPTY, "error": make_error}
                if example is not None:
                    record.update(tokens=example.meta.get("tokens"), answer=example.answer)
                    budget = max_new_tokens or getattr(task, "MAX_NEW_TOKENS", 16)
                    try:
                        record.update(run_cell(model, tokenizer, task, example, methods[label], recall_queries, budget,
                                                backend, process_group))
                        first = record.pop("_first_logprobs", None)
                        if methods[label].name == "dense" and reference is None:
                            reference = first
                        if reference is not None and first is not None:
                            record["kl_first"] = kl_divergence(reference, first)
                    except Exception as err:  # one method failing must not end the sweep
                        record["error"] = f"{type(err).__name__}: {err}"
                failed += record["error"] is not None
                record["time"] = dt.datetime.now().isoformat(timespec="seconds")
                line = json.dumps(record, default=_jsonable)
                if sink is not None:
                    sink.write(line + "\n")
                    sink.flush()
                records.append(json.loads(line))
                ran += 1
                if bar is not None:
                    progress.advance(bar)
    return SweepSummary(ran, skipped, failed, records)


def kl_divergence(reference: Tensor, other: Tensor) -> float:
    """``KL(reference || other)`` in nats of two ``[V]`` log-probability vectors: how far a method's next-token
    distribution at the answer position is from dense's (0: the same distribution)."""
    return float((reference.exp() * (reference - other)).sum().clamp_min(0.0))


def parse_lengths(text: str) -> list[int]:
    """``"2k,4k,8192"`` -> ``[2048, 4096, 8192]`` (k = 1024)."""
    out = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError as err:
            raise ValueError(f"lengths must be comma-separated token counts like 2k,4096; got {part!r}") from err
    if not out:
        raise ValueError("lengths must name at least one length")
    return out


def nan_to_none(value: float | None) -> float | None:
    """JSON has no NaN: an undefined ratio is written as null."""
    return None if value is None or math.isnan(value) else value
