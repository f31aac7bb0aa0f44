"""Routing Transformer, training-free: causal online spherical k-means routes each query to key blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longattn.core.checks import check_int
from longattn.methods.base import SelectionContext, group_queries
from longattn.methods.topk import TopKMethod
from longattn.ops.kmeans import assign, causal_spherical_kmeans, key_weight


@dataclass(frozen=True)
class Routes:
    """One call's clustering of a layer's keys, shared by every query chunk of :meth:`Routing.select`.

    Attributes:
        centroids: ``[B, Hkv, E, C, D]`` unit centroid set of each epoch (E = epochs holding keys).
        histogram: ``[B, Hkv, E, C, Nblk / E]`` valid keys of each block (blocks grouped by epoch, the last
            epoch padded with empty blocks) in each cluster of its epoch's set.
        mean_key: ``[B, Hkv, Nblk, D]`` mean unit key of each block (norm <= 1), for tie-breaking.
    """

    centroids: Tensor
    histogram: Tensor
    mean_key: Tensor


@dataclass
class Routing(TopKMethod):
    """Routing attention without training: spherical k-means clusters the head's unit keys, and a query block
    retrieves the ``top_k`` key blocks holding the most keys in its queries' ``route_top`` nearest clusters.
    The clustering is causal: keys are clustered in epochs of ``epoch_tokens``, each epoch against centroids
    fitted only on earlier epochs, so no query's choice depends on later keys.
    Paper: Routing Transformers, https://arxiv.org/abs/2003.05997
    """

    block_size: int = 16
    window: int = 128
    sink_tokens: int = 16
    top_k: int = 32
    """Blocks retrieved per query block (32 x 16 = 512 tokens) beyond the sinks and the window."""
    clusters: int = 32
    """Centroids per KV head (the paper uses about sqrt(T) clusters)."""
    route_top: int = 2
    """Nearest clusters of a query whose keys count toward a block's score, 1..``clusters``."""
    iterations: int = 2
    """Lloyd refinements of the centroids on each finished epoch's keys."""
    epoch_tokens: int = 1024
    """Keys clustered against one centroid set, a positive multiple of ``block_size``. Shorter epochs refit
    the centroids sooner (the first epoch only has the random initial ones); longer ones cost fewer updates."""
    seed: int = 0
    """Seed of the random unit centroids that cluster the first epoch."""

    name: ClassVar[str] = "routing"
    paper: ClassVar[str] = (
        "Efficient Content-Based Sparse Attention with Routing Transformers https://arxiv.org/abs/2003.05997"
    )
    summary: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("clusters", self.clusters, 1)
        check_int("route_top", self.route_top, 1)
        if self.route_top > self.clusters:
            raise ValueError(f"route_top must lie in [1, clusters={self.clusters}], got {self.route_top}")
        check_int("iterations", self.iterations, 1)
        check_int("epoch_tokens", self.epoch_tokens, 1)
        if self.epoch_tokens % self.block_size:
            raise ValueError(
                f"epoch_tokens must be a positive multiple of block_size={self.block_size}, got {self.epoch_tokens}"
            )
        check_int("seed", self.seed, 0)

    def prepare(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Routes:
        """Cluster the keys once for all query chunks (per chunk it would cost O(T) each, O(T^2) per call)."""
        return self.routes(ctx)

    def cluster(self, keys: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Causal online spherical k-means of ``keys [B, Hkv, Tk, D]`` (``key_mask [B, Tk]``: padding moves no
        centroid): centroid sets ``[B, Hkv, E, C, D]`` and each key's cluster ``[B, Hkv, Tk]``
        (:func:`longattn.ops.kmeans.causal_spherical_kmeans`)."""
        return causal_spherical_kmeans(keys, key_mask, self.clusters, self.epoch_tokens, self.iterations, self.seed)

    def routes(self, ctx: SelectionContext) -> Routes:
        """Cluster the step's raw keys and summarise each block by its cluster histogram and mean unit key.

        The layer's clustering is kept in ``ctx.memory`` between the steps of a sequence: keys appended inside
        the last epoch are only assigned to its set (fixed: it learnt from earlier epochs only) and added to the
        block summaries, so a decode step costs O(new keys), not a clustering of the whole cache (1 s per token
        at 16k). A step that starts a new epoch clusters again."""
        keys = self.raw_keys(ctx)
        memory = ctx.memory if ctx.memory is not None else {}
        state = self._extended(memory.get("routing"), keys, ctx.key_mask)
        if state is None:
            sets, assigned = self.cluster(keys, ctx.key_mask)
            b, hkv, _, d = keys.shape
            slots = sets.shape[2] * (self.epoch_tokens // self.block_size)  # blocks of the epochs holding keys
            state = {"sets": sets, "hist": torch.zeros(b, hkv, slots * self.clusters, device=keys.device),
                     "sums": torch.zeros(b, hkv, slots, d, device=keys.device),
                     "valid": torch.zeros(b, 1, slots, device=keys.device)}
            self._add(state, keys, ctx.key_mask, assigned, 0)
        memory["routing"] = state
        b, hkv, tk, _ = keys.shape
        epochs, nkb = state["sets"].shape[2], -(-tk // self.block_size)
        hist = state["hist"].view(b, hkv, epochs, -1, self.clusters).transpose(-1, -2)  # [B, Hkv, E, C, Nblk / E]
        mean_key = state["sums"][:, :, :nkb] / state["valid"][:, :, :nkb, None].clamp(min=1)
        return Routes(state["sets"], hist, mean_key)

    def _extended(self, state: dict | None, keys: Tensor, key_mask: Tensor | None) -> dict | None:
        """``state`` with the keys after its own appended, or None where it does not hold their prefix or they
        reach a new epoch."""
        b, hkv, tk, d = keys.shape
        if state is None or state["sets"].shape[:2] != (b, hkv) or not state["tk"] < tk:
            return None
        p, mask = state["tk"], state["mask"]
        if -(-tk // self.epoch_tokens) > state["sets"].shape[2] or not torch.equal(keys[:, :, p - 1], state["probe"]):
            return None
        if (mask is None) != (key_mask is None) or (mask is not None and not torch.equal(key_mask[:, :p], mask)):
            return None
        self._add(state, keys, key_mask, assign(keys[:, :, p:], state["sets"][:, :, -1]), p)
        return state

    def _add(self, state: dict, keys: Tensor, key_mask: Tensor | None, assigned: Tensor, start: int) -> None:
        """Count ``keys[:, :, start:]`` (clusters ``assigned [B, Hkv, n]``) into the block histogram and sums."""
        b, hkv, tk, d = keys.shape
        n = tk - start
        w = key_weight(None if key_mask is None else key_mask[:, start:], b, n, keys.device)  # [B, 1, n]
        block = (torch.arange(start, tk, device=keys.device) // self.block_size).view(1, 1, n)
        state["hist"].scatter_add_(2, block * self.clusters + assigned, w.expand(b, hkv, n))
        unit = torch.nn.functional.normalize(keys[:, :, start:].float(), dim=-1) * w.unsqueeze(-1)
        state["sums"].scatter_add_(2, block.unsqueeze(-1).expand(b, hkv, n, d), unit)
        state["valid"].scatter_add_(2, block.expand(b, 1, n), w)
        state["tk"], state["probe"] = tk, keys[:, :, tk - 1].clone()
        state["mask"] = None if key_mask is None else key_mask.clone()

    def block_scores(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        """``q [B, Hq, Tq, D]`` -> ``[B, Hq, Qblk, Nblk]``.

        A block's score is the most of its keys that lie in one query's ``route_top`` nearest clusters of the
        block's epoch set (max over the query block's queries), plus a tie-breaker in [0, 0.5] (the cosine
        between the query block's mean unit query and the block's mean unit key): the ranking is total, and a
        higher count always wins.

        Args:
            prepared: the :class:`Routes` that :meth:`prepare` computed once for the step (None: recomputed).
        """
        routes = prepared if isinstance(prepared, Routes) else self.routes(ctx)
        b, hq, tq, d = q.shape
        hkv, epochs = routes.centroids.shape[1], routes.centroids.shape[2]
        nkb, nqb = routes.mean_key.shape[2], -(-tq // qbs)
        g = torch.nn.functional.normalize(group_queries(q, hkv), dim=-1)  # [B, Hkv, G, Tq, D]
        if nqb * qbs != tq:
            # Zero rows fill the last query block; they add nothing to its pooled query.
            g = torch.nn.functional.pad(g, (0, 0, 0, nqb * qbs - tq))
        sims = g.reshape(b, hkv, 1, -1, d) @ routes.centroids.transpose(-1, -2)  # [B, Hkv, E, G*Tq', C]
        routed = self._nearest(sims)
        # A padding row routes nowhere, so its hits (0) never exceed a real row's max.
        routed.view(b, hkv, epochs, -1, nqb * qbs, self.clusters)[..., tq:, :] = 0
        hits = (routed @ routes.histogram).view(b, hkv, epochs, -1, nqb, qbs, routes.histogram.shape[-1])
        hits = hits.amax(dim=5)  # [B, Hkv, E, G, Qblk, Nblk / E]
        hits = hits.permute(0, 1, 3, 4, 2, 5).reshape(b, hq, nqb, -1)[..., :nkb]
        # The tie-breaker only orders equal counts, so one pooled query per block is enough.
        pooled = g.view(b, hkv, -1, nqb, qbs, d).sum(4)
        tie = torch.einsum("bhgqd,bhnd->bhgqn", torch.nn.functional.normalize(pooled, dim=-1), routes.mean_key)
        return hits + 0.25 * (1 + tie.reshape(b, hq, nqb, nkb))

    def _nearest(self, sims: Tensor) -> Tensor:
        """``[..., C]`` similarities -> float ``[..., C]``, 1 on the ``route_top`` largest (ties all count).

        A few max passes instead of ``topk``, which is several times slower over 32-wide rows on CPU.
        """
        rest = sims
        for _ in range(self.route_top - 1):
            rest = rest.masked_fill(rest >= rest.amax(-1, keepdim=True), float("-inf"))
        return (sims >= rest.amax(-1, keepdim=True)).float()
