"""Head profiling: run needle prompts through a model with dense attention and score every head.

The driver above the instruments: it generates (hf, bench) while a :class:`~longattn.analysis.heads.HeadRecorder`
observes, and turns what it saw into a :class:`~longattn.core.profile.HeadProfile`.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import torch
from torch import Tensor

from longattn.analysis.heads import HeadRecorder, retrieval_hits
from longattn.bench.generate import greedy_generate
from longattn.bench.tasks import niah_single
from longattn.core.profile import HeadProfile, model_identity
from longattn.hf import apply
from longattn.methods import get_method


def copy_hits(model: Any, input_ids: Tensor, span: tuple[int, int], recorder: HeadRecorder, max_new_tokens: int,
              eos_token_id: int | None = None) -> tuple[list[int], Tensor]:
    """Generate greedily with dense attention under ``recorder`` and score every head's copying.

    Args:
        input_ids: ``[1, T]`` the prompt; span: ``[start, end)`` token positions of the answer in it.

    Returns:
        The generated token ids and ``[L, Hq]`` hits / answer tokens (the prompt's retrieval scores).
    """
    start, end = span
    if not 0 <= start < end <= input_ids.shape[1]:
        raise ValueError(f"span must satisfy 0 <= start < end <= {input_ids.shape[1]}, got {span}")
    ident = model_identity(model)
    recorder.reset()
    with apply(model, get_method("dense"), observer=recorder):
        result = greedy_generate(model, input_ids, max_new_tokens, eos_token_id=eos_token_id)
    generated = result.tokens.tolist()
    hits = retrieval_hits(recorder.argmax, generated, input_ids[0].tolist(), span, ident["num_layers"],
                          ident["num_heads"])
    return generated, hits / (end - start)


def encode_needle_prompt(tokenizer: Any, example: Any) -> tuple[Tensor, tuple[int, int]]:
    """Tokenize a one-needle example once: ``input_ids [1, T]`` and the answer's token span ``[start, end)``.

    The answer's characters are found inside the needle (``meta["needle_positions"][0]``,
    ``meta["needles"][0]``); the span comes from the same encoding's offsets (fast tokenizers only).
    """
    needle_at = example.meta["needle_positions"][0]
    start = needle_at + example.meta["needles"][0].index(example.answer)
    end = start + len(example.answer)
    enc = tokenizer(example.prompt, return_offsets_mapping=True, return_tensors="pt")
    if "offset_mapping" not in enc:
        raise ValueError("profiling needs a fast tokenizer (one that returns offset mappings)")
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"][0].tolist()) if b > a and a < end and b > start]
    if not inside:
        raise ValueError(f"no token covers the answer's characters [{start}, {end}) of the prompt")
    return enc["input_ids"], (inside[0], inside[-1] + 1)


def profile_heads(
    model: Any,
    tokenizer: Any,
    *,
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    seeds: Sequence[int] = (0,),
    haystack: str = "natural",
    sink_tokens: int = 4,
    window: int = 256,
    sampled_queries: int = 32,
    sink_factor: float = 10.0,
    retrieval_threshold: float = 0.1,
    streaming_threshold: float = 0.9,
    max_new_tokens: int = 12,
    model_name: str | None = None,
    progress: Any = None,
) -> HeadProfile:
    """Profile every head of ``model`` on ``niah_single`` prompts (dense attention, greedy answers).

    Args:
        lengths, depths, seeds: the prompt grid (one prompt per combination).
        haystack: "natural" (real sentences; copying heads are not distracted by repeated filler) or "repeat".
        sink_tokens, window: what the streaming score counts as local (match the ``duo`` you will run).
        sampled_queries: query rows per prompt for the streaming score and the sink map.
        sink_factor: a token is a sink in a head when it receives ``>= sink_factor`` times the uniform share.
        retrieval_threshold, streaming_threshold: how heads are classified.
        model_name: the name stored in the profile (default: the config's ``_name_or_path``).
        progress: a ``rich.progress.Progress`` to report to (None: silent).

    Returns:
        The model's :class:`HeadProfile`; ``settings["accuracy"]`` is the share of prompts answered right.
    """
    for name, value in (("sink_factor", sink_factor), ("retrieval_threshold", retrieval_threshold),
                        ("streaming_threshold", streaming_threshold)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not lengths or not depths or not seeds:
        raise ValueError("lengths, depths and seeds must each hold at least one value")
    ident = model_identity(model)
    if model_name is not None:
        ident["name"] = model_name
    layers, heads = ident["num_layers"], ident["num_heads"]
    recorder = HeadRecorder(sink_tokens=sink_tokens, window=window, sampled_queries=sampled_queries)
    hits, streaming = torch.zeros(layers, heads), torch.zeros(layers, heads)
    hidden, initial = torch.zeros(layers, heads), torch.zeros(layers, heads)
    sink_text: dict[tuple[int, int], Counter] = {}
    sink_info: dict[tuple[int, int, str], list[float | int]] = {}
    texts: dict[int, str] = {}
    correct, prompts = 0, [(n, d, s) for n in lengths for d in depths for s in seeds]
    task = progress.add_task("profiling heads", total=len(prompts)) if progress is not None else None
    device = next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    for length, depth, seed in prompts:
        example = niah_single.make(tokenizer, length, depth, seed, haystack=haystack)
        ids, span = encode_needle_prompt(tokenizer, example)
        ids = ids.to(device)
        generated, prompt_hits = copy_hits(model, ids, span, recorder, max_new_tokens, eos)
        correct += int(niah_single.score(example, tokenizer.decode(generated, skip_special_tokens=True)))
        prompt_ids = ids[0].tolist()
        hits += prompt_hits
        # Only layers that run full attention are observed: a sliding-window layer keeps its window, so the
        # method never selects there and there is nothing to profile.
        for layer in sorted(recorder.streaming):
            streaming[layer] += recorder.streaming[layer]
            ratio = recorder.ratios[layer]  # [Hq, Tk]
            is_sink = ratio >= sink_factor
            share = recorder.mass[layer]
            initial[layer] += (share[:, :sink_tokens] * is_sink[:, :sink_tokens]).sum(-1)
            hidden[layer] += (share[:, sink_tokens:] * is_sink[:, sink_tokens:]).sum(-1)
            for head in range(heads):
                for pos in is_sink[head, sink_tokens:].nonzero().flatten().tolist():
                    pos += sink_tokens
                    if prompt_ids[pos] not in texts:  # " the" alone is a sink thousands of times
                        texts[prompt_ids[pos]] = tokenizer.decode([prompt_ids[pos]])
                    text = texts[prompt_ids[pos]]
                    sink_text.setdefault((layer, head), Counter())[text] += 1
                    info = sink_info.setdefault((layer, head, text), [0.0, []])
                    info[0] = max(info[0], float(ratio[head, pos]))
                    if len(info[1]) < 5:
                        info[1].append(pos)
        if task is not None:
            progress.advance(task)
    n = len(prompts)
    profiled = sorted(recorder.streaming)
    for layer in set(range(layers)) - set(profiled):
        streaming[layer] = n  # a sliding-window layer attends its window only: streaming by construction
    sinks = []
    for (layer, head), counts in sorted(sink_text.items()):
        tokens = [{"text": text, "count": count, "ratio": round(sink_info[(layer, head, text)][0], 2),
                   "positions": sink_info[(layer, head, text)][1]} for text, count in counts.most_common(5)]
        sinks.append({"layer": layer, "head": head, "tokens": tokens})
    settings = {
        "task": "niah_single", "haystack": haystack, "lengths": list(lengths), "depths": list(depths),
        "seeds": list(seeds), "prompts": n, "sink_tokens": sink_tokens, "window": window,
        "sampled_queries": sampled_queries, "sink_factor": sink_factor, "max_new_tokens": max_new_tokens,
        "retrieval_threshold": retrieval_threshold, "streaming_threshold": streaming_threshold,
        "accuracy": correct / n, "profiled_layers": profiled,
    }

    def grid(t: Tensor) -> list[list[float]]:
        return [[round(float(x), 4) for x in row] for row in t / n]

    return HeadProfile(model=ident, settings=settings, retrieval=grid(hits), streaming=grid(streaming),
                       hidden_sink_mass=grid(hidden), initial_sink_mass=grid(initial), sinks=sinks)
