"""Greedy generation that times prefill and decode separately."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from longattn.hf import default_cache
from longattn.hf.parallel import ShardedCache, parallel_prefill


@dataclass(frozen=True)
class GenerationResult:
    """Tokens produced and where the time went.

    Attributes:
        tokens: ``[new]`` generated token ids.
        prefill_s: seconds for the prompt's forward pass (time to first token).
        decode_s: seconds for the remaining decode steps.
        cache: the model's KV cache after the last step. It holds the prompt and every generated token but the
            last one (which was never fed back), so a conversation continues by feeding that token (unless it
            is EOS) followed by the next turn's text.
    """

    tokens: Tensor
    prefill_s: float
    decode_s: float
    cache: Any = None
    first_logprobs: Tensor | None = None
    """``[V]`` float32 log-probabilities of the first generated token (the answer position), for comparing a
    method's next-token distribution with dense's (:func:`longattn.bench.runner.kl_divergence`)."""


@torch.inference_mode()
def greedy_generate(
    model: Any,
    input_ids: Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    past_key_values: Any = None,
    prefill_chunk: int | None = 2048,
) -> GenerationResult:
    """Greedy decoding on a :class:`~longattn.hf.cache.GrowingCache` (or the given cache); only the last position's
    logits are ever computed.

    Args:
        input_ids: ``[1, T]`` prompt tokens, ``T >= 1`` (the new tokens only, when continuing ``past_key_values``).
        max_new_tokens: upper bound on generated tokens (>= 1).
        past_key_values: a cache from an earlier :class:`GenerationResult` to continue (a follow-up turn);
            the prompt is then "prefilled" on top of it. None: a new cache (``longattn.hf.default_cache``: a
            ``GrowingCache``, or the session's ``ShardedCache`` under ``apply(..., process_group=...)``, whose
            prompt each rank prefills as its own shard in one pass).
        prefill_chunk: prompt tokens per forward pass in prefill (None: the whole prompt at once). Segments
            go through the same attention path with the growing cache, so activations stay at one segment's
            size and peak memory grows only with the KV cache (linear in the prompt).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        # Nothing to prefill means no logits to pick the first token from (even on top of a cache).
        raise ValueError("input_ids must hold at least one token, got an empty prompt of shape (1, 0)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive int or None, got {prefill_chunk!r}")
    start = time.perf_counter()
    step = input_ids.shape[1] if prefill_chunk is None else prefill_chunk
    # A cache that appends in place: DynamicCache copies the whole cache per decoded token (GrowingCache).
    # (under a process_group, the session's ShardedCache)
    cache = default_cache(model) if past_key_values is None else past_key_values
    if isinstance(cache, ShardedCache) and cache.edges is None:
        # Context parallel: each rank prefills its own shard of the prompt in one pass (prefill_chunk unused).
        last = parallel_prefill(model, input_ids, cache)
    else:
        for first in range(0, input_ids.shape[1], step):
            # logits_to_keep=1: a 12k prompt's full logits would be 12k x vocab floats (GBs) for one needed row.
            out = model(input_ids=input_ids[:, first : first + step], past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            cache = out.past_key_values
        last = out.logits[:, -1]
    prefill = time.perf_counter() - start
    first_logprobs = torch.log_softmax(last[0].float(), dim=-1)
    token = last.argmax(-1, keepdim=True)
    generated = [token]
    start = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and int(token) == eos_token_id:
            break
        out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
    decode = time.perf_counter() - start
    return GenerationResult(torch.cat(generated, dim=1)[0], prefill, decode, cache, first_logprobs)
