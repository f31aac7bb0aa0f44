"""The live state of one ``apply``: what each layer's attention call runs, and what it counts.

Per forward step the session builds what every layer shares once (the resolved backend, the step's
sinks / window / causal patterns); per layer it asks the method where to look (a Selection) and the
operator to compute there, then lets the method adjust the output (where it declares ``adjusts_output``)
and the observer watch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from longattn.core.index import BlockIndex
from longattn.core.kv import ShardedKV, SplitKV
from longattn.core.pattern import real_query_rows
from longattn.core.reposition import Reposition
from longattn.core.rope import Rope
from longattn.core.selection import Selection, causal_pairs
from longattn.hf.stats import AttentionStats, Observer
from longattn.methods.base import Method, SelectionContext
from longattn.ops.block_sparse import (
    REPOSITION_BACKENDS,
    block_sparse_attention,
    resolve_backend,
    split_kv_attention,
)
from longattn.ops.dense import sliding_window_attention
from longattn.ops.parallel import broadcast_from_last, merge_across_ranks


SESSION_ATTR = "_longattn_session"
"""The attribute ``apply`` sets on each attention module: the module's active :class:`Session`."""


@dataclass
class Session:
    """The live state of one ``apply``: the method, its block index, the work statistics and an observer.

    Per forward step it builds what every layer shares once (the resolved backend, the sinks / window /
    causal patterns of :mod:`longattn.core.pattern`); per layer it asks the method where to look and the
    operator to compute there.
    """

    method: Method
    backend: str = "auto"
    observer: Observer | None = None
    stats: AttentionStats = field(default_factory=AttentionStats)
    prefill_stats: AttentionStats = field(default_factory=AttentionStats)
    index: BlockIndex | None = None
    rope: Rope | None = None
    """The model's RoPE, needed when the method's ``positions`` policy moves keys (``apply`` reads it)."""
    reposition: Reposition | None = field(default=None, init=False)
    _step_cache: dict = field(default_factory=dict, init=False, repr=False)
    _step: tuple[int, int, int] = field(default=(-1, -1, -1), init=False, repr=False)
    _backends: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _means: tuple[BlockIndex | None, BlockIndex] | None = field(default=None, init=False, repr=False)
    _memory: dict[int, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)
    cache_factory: Callable[[], Any] | None = field(default=None, repr=False)
    """What :meth:`new_cache` calls (``apply`` sets it: it knows the model)."""
    parallel: bool = False
    """Whether the session runs under a ``process_group`` (its cache is sharded over ranks)."""

    def __post_init__(self) -> None:
        summariser = self.method.summariser()
        if summariser is not None:
            self.index = BlockIndex(self.method.block_size, summariser)
        if getattr(self.method, "uses_block_means", False):
            # Kept like the block summaries, a block at a time: recomputing them would read all of K and V
            # at every decode step, which is what dense decode costs. Mean keys are the summaries themselves
            # where the method's index keeps means (MoBA); only the values then need an index of their own.
            bs = self.method.block_size
            keys = None if summariser == "mean" else BlockIndex(bs, "mean")
            self._means = (keys, BlockIndex(bs, "mean"))
        policy = self.method.position_policy()
        if policy.changes_positions:
            if self.rope is None:
                raise ValueError(
                    f"positions={policy.name!r} needs the model's RoPE frequencies: run the method through "
                    "longattn.apply(model, method), which reads them"
                )
            if self.method.adjusts_output:
                raise ValueError(
                    f"method {self.method.name!r} adjusts attention outputs with keys at their real positions; "
                    f"it cannot be combined with positions={policy.name!r} (use positions='original')"
                )
            if not policy.by_regions and self.backend not in REPOSITION_BACKENDS:
                raise ValueError(
                    f"positions={policy.name!r} runs on backend {', '.join(map(repr, REPOSITION_BACKENDS))} (only "
                    f"the PyTorch paths re-rotate keys), not {self.backend!r}"
                )
            self.reposition = Reposition(policy, self.rope, self.method.window)

    def new_cache(self) -> Any:
        """A KV cache for this session's model and method (a ``HeadAwareCache`` where the method declares
        streaming heads, else a ``GrowingCache``), to pass as ``past_key_values``."""
        if self.cache_factory is None:
            raise RuntimeError("new_cache needs the model: use the session that `longattn.apply` returns")
        return self.cache_factory()

    @property
    def moves_single_blocks(self) -> bool:
        """Whether the position policy moves far blocks one by one (``longheads``), which only the PyTorch
        backends apply; every other policy runs as region passes on any backend."""
        return self.reposition is not None and not self.reposition.policy.by_regions

    def _begin(self, layer: int, tq: int, tk: int, device_type: str) -> str:
        """Start a new forward step when this call is not the next layer of the current one; returns the
        step's resolved backend. A step is one model forward: every layer sees the same ``(Tq, Tk)``, and the
        cache grows between steps, so a repeated ``(Tq, Tk)`` or a layer index that does not increase means
        a new step (a new ``generate`` call included)."""
        if (tq, tk) != self._step[:2] or layer <= self._step[2]:
            self._step_cache.clear()
        self._step = (tq, tk, layer)
        if device_type not in self._backends:
            self._backends[device_type] = resolve_backend(self.backend, device_type, self.moves_single_blocks)
        return self._backends[device_type]

    def attend(
        self, module: Any, q: Tensor, k: "Tensor | SplitKV", v: "Tensor | SplitKV", key_mask: Tensor | None,
        scale: float, sliding_window: int | None = None,
    ) -> Tensor:
        """One layer's attention. ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]`` -> ``[B, Tq, Hq, D]``.

        ``k`` (and ``v``, the same object) may be a :class:`~longattn.core.kv.SplitKV` from a head-aware cache:
        the method then selects without summaries or raw keys (it declared which heads read only sinks and
        window), the operator runs per head group (:func:`~longattn.ops.block_sparse.split_kv_attention`), and
        the cache is told afterwards what it may drop.

        A sliding-window layer (``sliding_window``, as the model defines it) runs exactly as the model does,
        at window cost (:func:`~longattn.ops.dense.sliding_window_attention`): the method selects on the
        full-attention layers only, and only they are counted in the stats and seen by the observer.
        """
        if isinstance(k, ShardedKV):
            if sliding_window is not None:
                raise ValueError("context parallelism does not run sliding-window layers (ShardedCache refuses them)")
            return self._attend_sharded(module, q, k, key_mask, scale)
        split = k if isinstance(k, SplitKV) else None
        if sliding_window is not None:
            if split is not None:
                raise ValueError("a sliding-window layer got a head-aware cache layer; its cache must be a "
                                 "sliding-window layer (HeadAwareCache.for_method builds one)")
            return sliding_window_attention(q, k, v, int(sliding_window), scale, key_mask).transpose(1, 2)
        b, hq, tq, _ = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        layer = int(getattr(module, "layer_idx", 0))
        backend = self._begin(layer, tq, tk, q.device.type)
        if split is not None:
            self._check_split(split, layer, hq)
        summaries = None
        if self.index is not None:
            summaries = self.index.update(k, layer, new_tokens=tq, q=q)
        ctx = SelectionContext(
            kv_len=tk, q_offset=tk - tq, layer=layer, num_kv_heads=hkv, key_mask=key_mask, device=q.device,
            keys=None if split is not None else k, reposition=self.reposition, backend=backend,
            step_cache=self._step_cache, scale=scale,
            block_means=None if split is not None else self._block_means(k, v, key_mask, layer, tq, summaries),
            memory=self._layer_memory(layer, tq, tk), kv_split=split,
        )
        selection = self.method.select(self._selecting_queries(q, key_mask, tk), summaries, ctx)
        if split is not None:
            out, lse = split_kv_attention(q, split, selection, scale, key_mask=key_mask, backend=backend)
        else:
            out, lse = block_sparse_attention(
                q, k, v, selection, scale, causal=True, key_mask=key_mask, backend=backend,
                reposition=self.reposition, moved_keys=self._moved_keys(k, ctx.memory, tq),
            )
        if self.method.adjusts_output:
            out = self.method.adjust_output(out, lse, q, None if split else k, None if split else v, selection, ctx,
                                            scale)
        # Every head dense: its pairs are the causal ones, known without counting the Selection's blocks.
        computed = b * hq * causal_pairs(tq, tk) if selection.all_dense else (
            selection.pairs(tq, tk).sum() * (hq // selection.num_heads))
        self._count(tq, tk, computed, b * hq)
        if self.observer is not None:
            # Observers see the layer as a full cache would hold it; what streaming heads dropped reads NaN.
            keys, values = split.logical() if split is not None else (k, v)
            self.observer(layer, q, keys, selection, scale, key_mask)
            watch_output = getattr(self.observer, "observe_output", None)
            if watch_output is not None:
                watch_output(layer, q, keys, values, out, scale, key_mask)
        if split is not None and split.release is not None:
            split.release(key_mask)
        return out.transpose(1, 2)  # HF reshapes [B, Tq, Hq, D] itself

    def _attend_sharded(self, module: Any, q: Tensor, kv: ShardedKV, key_mask: Tensor | None, scale: float) -> Tensor:
        """A step after a context-parallel prefill, on one rank. ``q [B, Hq, Tq, D]`` (the same on every rank),
        ``kv`` this rank's shard -> ``[B, Tq, Hq, D]``, the same on every rank.

        The last rank (it holds the sequence's end, the block summaries of every block and the method's memory of
        the prefill's last queries) selects over the whole sequence and broadcasts the block mask; every rank
        attends its own selected blocks and the parts are merged exactly by log-sum-exp.
        """
        if key_mask is not None:
            raise ValueError("context parallelism runs batches without padding: every row must be a full sequence "
                             "(pass no attention_mask, or one of all ones)")
        if self.observer is not None:
            raise ValueError("observers do not run under context parallelism (each rank holds part of the keys)")
        b, hq, tq, _ = q.shape
        hkv, tk = kv.keys.shape[1], kv.kv_len
        layer = int(getattr(module, "layer_idx", 0))
        backend = self._begin(layer, tq, tk, q.device.type)
        bs = self.method.block_size
        qbs = self.method.query_block_size_for(tq)
        nblk, qblk = -(-tk // bs), -(-tq // qbs)
        # One broadcast per layer: the mask's head count (Hq, or Hkv when GQA groups share) in front of the mask,
        # in a buffer sized for Hq; 255 there says the last rank failed (the others must not wait for a mask).
        size = b * hq * qblk * nblk
        buffer = torch.zeros(1 + size, dtype=torch.uint8, device=q.device)
        if kv.is_last:
            summaries = None
            if self.index is not None:
                summaries = self.index.update(kv.keys, layer, new_tokens=tq, q=q, start=kv.start)
            ctx = SelectionContext(
                kv_len=tk, q_offset=tk - tq, layer=layer, num_kv_heads=hkv, key_mask=None, device=q.device,
                keys=None, backend=backend, step_cache=self._step_cache, scale=scale,
                memory=self._layer_memory(layer, tq, tk),
            )
            try:
                chosen = self.method.select(q, summaries, ctx)
            except Exception as err:
                buffer[0] = 255
                broadcast_from_last(buffer, kv.group)
                if isinstance(err, ValueError) and "raw keys" in str(err):
                    raise ValueError(f"method {self.method.name!r} scores raw keys after the prefill; under context "
                                     "parallelism they live on other ranks, so it runs there in prefill only") from err
                raise
            mask = chosen.to_mask(nblk)
            buffer[0] = mask.shape[1]
            buffer[1 : 1 + mask.numel()] = mask.reshape(-1)
        elif self.index is not None:
            self.index.reset_layer(layer)  # what this rank indexed in prefill: only the last rank selects now
        broadcast_from_last(buffer, kv.group)
        heads = int(buffer[0])
        if heads == 255:
            raise RuntimeError(f"layer {layer}: the last rank of the group could not select this step's blocks "
                               "(its error says why)")
        mask = buffer[1 : 1 + b * heads * qblk * nblk].view(b, heads, qblk, nblk).bool()
        selection = Selection.from_mask(mask, qbs, bs)  # the step's global selection, for the stats
        first = kv.start // bs
        local = Selection.from_mask(mask[..., first : -(-(kv.start + kv.keys.shape[2]) // bs)].contiguous(), qbs, bs)
        # Every key of an earlier rank precedes every query: only the last rank's shard needs the causal limit.
        out, lse = block_sparse_attention(q, kv.keys, kv.values, local, scale, causal=kv.is_last, backend=backend)
        out, _ = merge_across_ranks(out, lse, kv.group)
        self._count(tq, tk, selection.pairs(tq, tk).sum() * (hq // selection.num_heads), b * hq)
        return out.transpose(1, 2)

    def _check_split(self, split: SplitKV, layer: int, hq: int) -> None:
        """A head-aware cache layer must keep what this method reads: the same streaming heads and geometry."""
        declared = self.method.streaming_kv_heads(layer, hq, split.num_kv_heads)
        held = tuple(h in split.stream_heads for h in range(split.num_kv_heads))
        if declared is None or tuple(declared) != held:
            raise ValueError(
                f"layer {layer}'s head-aware cache keeps KV heads {split.stream_heads} as streaming heads, but method "
                f"{self.method.name!r} declares {declared}: build the cache for this method "
                "(HeadAwareCache.for_method) or let apply make it"
            )
        geometry = (self.method.block_size, self.method.sink_tokens, self.method.window)
        if (split.block_size, split.sink_tokens, split.window) != geometry:
            raise ValueError(
                f"the head-aware cache keeps blocks of {split.block_size}, {split.sink_tokens} sink tokens and a "
                f"{split.window}-token window, but the method uses {geometry}: build the cache for this method"
            )
        if self.index is not None or self._means is not None:
            raise ValueError(f"method {self.method.name!r} reads block summaries, which a head-aware cache does not keep")

    def _layer_memory(self, layer: int, tq: int, tk: int) -> dict[str, Any]:
        """The method's memory of ``layer`` for this sequence: emptied when a step starts a new one (nothing
        cached before it) or the cache is shorter than when the memory was last written (cropped)."""
        memory = self._memory.setdefault(layer, {})
        if tk == tq or tk < memory.get("_kv_len", 0):
            memory.clear()
        memory["_kv_len"] = tk
        return memory

    def _moved_keys(self, k: Tensor, memory: dict[str, Any] | None, tq: int) -> Tensor | None:
        """``k [B, Hkv, Tk, D]`` with the position policy's per-token shift, for the region passes: kept per
        layer in a buffer with headroom, so a step rotates only its own new keys (rotating the whole cache each
        decode step cost more than the attention). None without a region policy or a per-token shift."""
        policy = None if self.reposition is None else self.reposition.policy
        if policy is None or not policy.by_regions or memory is None:
            return None
        if policy.by_gather and self.backend in ("gather", "naive"):  # the operator's own policy code runs
            return None
        b, h, tk, d = k.shape
        entry = memory.get("_moved_keys")
        if entry is None or entry[0].shape[:2] != (b, h) or entry[0].dtype != k.dtype or entry[1] != tk - tq:
            moved = self.reposition.shifted_keys(k)
            if moved is None:
                return None
            buf = torch.empty(b, h, tk + max(256, tk // 32), d, dtype=k.dtype, device=k.device)
            buf[:, :, :tk] = moved
        else:
            buf, done = entry
            if tk > buf.shape[2]:  # out of headroom: grow by a margin, not per token
                grown = torch.empty(b, h, tk + max(256, tk // 32), d, dtype=k.dtype, device=k.device)
                grown[:, :, :done] = buf[:, :, :done]
                buf = grown
            moved = self.reposition.shifted_keys(k[:, :, done:tk], start=done)
            buf[:, :, done:tk] = moved
        memory["_moved_keys"] = (buf, tk)
        return buf[:, :, :tk]

    def reset_memory(self) -> None:
        """Forget what methods remembered between steps (``apply`` calls it on exit)."""
        self._memory.clear()

    def _block_means(self, k: Tensor, v: Tensor, key_mask: Tensor | None, layer: int, tq: int,
                     summaries: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
        """Mean key and value of every key block ``[B, Hkv, Nblk, D]`` and the valid keys per block ``[B, Nblk]``
        (for methods with ``uses_block_means``); None with padding, where the method masks them itself.
        ``summaries`` are this step's from the session's index, the mean keys where it keeps means."""
        if self._means is None or key_mask is not None:
            return None
        b, _, tk, _ = k.shape
        bs = self.method.block_size
        keys = self._means[0]
        k_means = (summaries if keys is None else keys.update(k, layer, new_tokens=tq))[:, :, :, 0]
        v_means = self._means[1].update(v, layer, new_tokens=tq)[:, :, :, 0]
        counts = torch.full((b, k_means.shape[2]), bs, dtype=torch.long, device=k.device)
        counts[:, -1] = tk - (k_means.shape[2] - 1) * bs
        return k_means, v_means, counts

    def _selecting_queries(self, q: Tensor, key_mask: Tensor | None, tk: int) -> Tensor:
        """``q [B, Hq, Tq, D]`` with every pad row's query replaced by a real row's (:func:`real_query_rows`,
        built once per step): selection must not depend on what the pad tokens are. The operator still
        computes with ``q`` itself."""
        tq = q.shape[2]
        if key_mask is None or tq == 1:
            return q
        key = ("real_query_rows", tq, tk)
        if key not in self._step_cache:
            self._step_cache[key] = real_query_rows(key_mask, tq, tk - tq)
        rows = self._step_cache[key]  # [B, Tq]
        return q.gather(2, rows.view(q.shape[0], 1, tq, 1).expand_as(q))

    def _count(self, tq: int, tk: int, computed: "int | Tensor", rows: int) -> None:
        for stats in (self.stats, self.prefill_stats) if tq > 1 else (self.stats,):
            stats.add_pairs(computed)
            stats.causal_pairs += causal_pairs(tq, tk) * rows
            stats.calls += 1
