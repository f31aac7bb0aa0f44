"""Context parallelism: one sequence's KV cache sharded by position over the ranks of a ``torch.distributed`` group.

Every rank runs the same model on the same prompt; what differs is which positions it owns.

- **Prefill** (:func:`parallel_prefill`): the prompt is cut into ``N`` contiguous shards, block-aligned
  (:func:`shard_bounds`); rank ``r`` runs the model on its shard only, at its real positions. A layer's keys and
  values are all-gathered (transient, one layer at a time), and rank ``r``'s queries attend keys
  ``[0, e_r)``: exactly chunk ``r`` of a chunked prefill, with the method selecting as it does there. The cache
  keeps only the shard's own keys and values.
- **Steps after it** (decode, a follow-up prompt): every rank runs the same tokens; their keys and values are
  appended to the **last** rank's shard. The last rank, which holds every block's summary and the method's
  memory of the prompt's end, selects over the whole sequence and broadcasts the block mask; each rank attends
  its own selected blocks and the parts merge exactly by log-sum-exp (two all-reduces,
  :func:`longattn.ops.parallel.merge_across_ranks`). Every rank ends with the same output, so the next layer's
  queries, and the logits, are the same everywhere.

Launch one process per rank (``torchrun --nproc-per-node N``), each with the same model and prompt::

    torch.distributed.init_process_group("gloo")               # NCCL on GPUs
    with longattn.apply(model, method, process_group=torch.distributed.group.WORLD) as session:
        result = longattn.bench.greedy_generate(model, ids, 32, cache=session.new_cache())
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from longattn.core.kv import ShardedKV
from longattn.hf.cache import GrowingLayer, _layout
from longattn.hf.session import SESSION_ATTR
from longattn.ops.parallel import all_gather_cat, broadcast_from_last


def shard_bounds(length: int, world_size: int, granule: int) -> list[int]:
    """Edges ``[0, e_0, ..., length]`` of ``world_size`` contiguous shards of ``length`` positions, as equal as
    whole ``granule``-position units allow (every edge but the last a multiple of ``granule``).

    Raises:
        ValueError: when ``length < world_size * granule`` (a rank would get no whole unit).
    """
    for name, value in (("length", length), ("world_size", world_size), ("granule", granule)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if length < world_size * granule:
        raise ValueError(f"a prompt of {length} tokens cannot be sharded over {world_size} ranks in whole blocks of "
                         f"{granule} tokens: it needs at least {world_size * granule} tokens (or fewer ranks)")
    units = length // granule
    edges = [round(r * units / world_size) * granule for r in range(world_size)]
    return edges + [length]


class ShardedLayer(GrowingLayer):
    """One layer of a :class:`ShardedCache`: this rank's positions ``[start, end)`` in a growing buffer
    (``keys`` / ``values`` ``[B, Hkv, n, D]``, views). ``update`` returns the whole prefix ``[0, end)`` in the
    prefill (gathered from the ranks) and a :class:`~longattn.core.kv.ShardedKV` afterwards."""

    def __init__(self, cache: "ShardedCache") -> None:
        super().__init__()
        self._cache = cache

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Store ``key_states, value_states [B, Hkv, Tnew, D]`` where this rank keeps them."""
        cache = self._cache
        if cache.edges is None:
            raise ValueError("a ShardedCache starts with longattn.hf.parallel.parallel_prefill(model, input_ids, cache) "
                             "(or greedy_generate with the cache): the prompt is sharded over the ranks there")
        if cache.prefilling:
            if self.get_local_length():
                raise ValueError("this layer's shard is already filled: a ShardedCache prefills once")
            super().update(key_states, value_states)
            # The prefix [0, end) of the whole sequence: every rank's shard, gathered for this layer only.
            end = cache.edges[cache.rank + 1]
            keys = all_gather_cat(key_states, 2, cache.group).narrow(2, 0, end)
            values = all_gather_cat(value_states, 2, cache.group).narrow(2, 0, end)
            return keys, values
        if cache.rank == cache.world_size - 1:
            super().update(key_states, value_states)
        elif not self.is_initialized:
            raise ValueError("this rank's shard is empty: the ShardedCache was not prefilled on every rank")
        kv = ShardedKV(self.keys, self.values, cache.edges[cache.rank], cache.length + key_states.shape[2],
                       cache.rank, cache.world_size, cache.group)
        return kv, kv

    def get_local_length(self) -> int:
        """Positions this rank holds for the layer."""
        return 0 if not self.is_initialized or self.keys is None or self.keys.dim() != 4 else self.keys.shape[2]

    def get_seq_length(self) -> int:
        # The whole sequence's length (what positions and masks follow); during the prefill, this rank's start.
        return self._cache.seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a ShardedCache cannot be cropped (its positions are spread over ranks)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("a ShardedCache does not run beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("a ShardedCache cannot change its batch")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise ValueError("a ShardedCache cannot change its batch")


class ShardedCache(Cache):
    """A KV cache sharded by position over the ranks of ``group``: each rank keeps its shard's keys and values
    (and, inside ``longattn.apply``, its block index). Made by ``session.new_cache()`` under
    ``apply(..., process_group=...)``; filled by :func:`parallel_prefill`.

    Args:
        config: the model's config (layers; sliding-window layers are refused).
        group: the process group (``torch.distributed.group.WORLD`` for all ranks).
        granule: shard edges are multiples of this (the method's key and query block sizes), so each rank's
            blocks and query blocks are those of the whole sequence.
    """

    def __init__(self, config: Any, group: Any, granule: int) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group needs torch.distributed initialised: call "
                             "torch.distributed.init_process_group('gloo') first (torchrun sets the environment)")
        for i, layer in enumerate(DynamicCache(config=config).layers):
            if type(layer) is not DynamicLayer:
                raise ValueError(f"layer {i} is a {type(layer).__name__} (a sliding-window layer); context "
                                 "parallelism runs models whose layers are all full attention")
        layers = _layout(config)[0]
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.granule = granule
        self.edges: list[int] | None = None
        self.prefilling = False
        self.length = 0
        Cache.__init__(self, layers=[ShardedLayer(self) for _ in range(layers)])

    def seq_length(self) -> int:
        """Tokens of the sequence before the current step (this rank's shard start during the prefill)."""
        if self.prefilling:
            assert self.edges is not None
            return self.edges[self.rank]
        return self.length

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if not self.prefilling and layer_idx == len(self.layers) - 1:
            self.length += key_states.shape[2]  # the step is stored once its last layer is
        return out

    def kv_bytes(self) -> tuple[int, int]:
        """``(held, allocated)`` bytes of keys and values on this rank."""
        from longattn.hf.cache import kv_bytes

        return kv_bytes(self)


@torch.inference_mode()
def parallel_prefill(model: Any, input_ids: Tensor, cache: ShardedCache) -> Tensor:
    """Prefill ``input_ids`` sharded over the ranks of ``cache``: each rank runs its shard (one forward pass).

    Every rank must call it with the same ``input_ids`` and the model inside ``longattn.apply`` (with the same
    ``process_group``).

    Args:
        input_ids: ``[B, T]`` the prompt, the same on every rank, without padding.
        cache: an empty :class:`ShardedCache`.

    Returns:
        ``[B, V]`` float32 logits of the prompt's last position, the same on every rank.
    """
    if not isinstance(cache, ShardedCache):
        raise ValueError(f"cache must be a ShardedCache (session.new_cache() under process_group), got "
                         f"{type(cache).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T >= 1, got shape {tuple(input_ids.shape)}")
    if cache.edges is not None:
        raise ValueError("this ShardedCache is already prefilled; continue with model(...) steps, or make a new one")
    edges = shard_bounds(input_ids.shape[1], cache.world_size, cache.granule)
    start, end = edges[cache.rank], edges[cache.rank + 1]
    stats = _session_stats(model)
    before = [(s.computed_pairs, s.causal_pairs) for s in stats]
    cache.edges, cache.prefilling = edges, True
    try:
        out = model(input_ids=input_ids[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        cache.prefilling = False
    cache.length = input_ids.shape[1]
    if stats:
        # Each rank counted its own queries; the session's statistics are the sequence's, the same on every rank.
        mine = torch.tensor([[s.computed_pairs - c, s.causal_pairs - k] for s, (c, k) in zip(stats, before)])
        total = mine.clone()
        dist.all_reduce(total, group=cache.group)
        for s, (c, k) in zip(stats, (total - mine).tolist()):
            s.add_pairs(int(c))
            s.causal_pairs += int(k)
    return broadcast_from_last(out.logits[:, -1].float().contiguous(), cache.group)


def _session_stats(model: Any) -> list[Any]:
    """The active longattn session's statistics (``stats``, ``prefill_stats``), or none outside ``apply``."""
    for module in model.modules():
        session = getattr(module, SESSION_ATTR, None)
        if session is not None:
            return [session.stats, session.prefill_stats]
    return []


def method_granule(method: Any) -> int:
    """The shard unit for ``method``: a multiple of its key block size and of its prefill query block size."""
    bs = int(method.block_size)
    qbs = int(method.query_block_size_for(2))
    return bs * qbs // math.gcd(bs, qbs)


__all__ = ["ShardedCache", "ShardedLayer", "method_granule", "parallel_prefill", "shard_bounds"]
