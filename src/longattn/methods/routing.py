"""Routing Transformer, training-free: causal online spherical k-means routes each query to key blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longattn.core.checks import check_int
from longattn.methods.base import SelectionContext, group_queries
from longattn.methods.topk import TopKMethod


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
        """Causal online spherical k-means over epochs of ``epoch_tokens`` keys.

        Epoch ``e``'s keys are assigned to centroid set ``e``; set ``e + 1`` adds them to the running
        per-cluster sums (``iterations`` Lloyd steps on epoch ``e``'s keys, warm-started from set ``e``). Set
        ``e`` therefore depends only on keys before epoch ``e``'s start. Cost O(Tk * C * D * iterations).

        Args:
            keys: ``[B, Hkv, Tk, D]`` raw keys.
            key_mask: ``[B, Tk]`` bool, False on padding keys (they move no centroid); None if all are valid.

        Returns:
            Centroid sets ``[B, Hkv, E, C, D]`` float32 unit vectors (E = epochs holding keys) and each key's
            cluster in its epoch's set ``[B, Hkv, Tk]`` int64.
        """
        b, h, tk, d = keys.shape
        unit = torch.nn.functional.normalize(keys.float(), dim=-1)
        weight = _key_weight(key_mask, b, tk, keys.device)  # [B, 1, Tk]
        gen = torch.Generator().manual_seed(self.seed)
        # One initial set for every head and batch row, so results do not depend on how many heads there are.
        first = torch.nn.functional.normalize(torch.randn(self.clusters, d, generator=gen), dim=-1)
        centroids = first.to(keys.device).expand(b, h, -1, -1)
        sums = torch.zeros(b, h, self.clusters, d, device=keys.device)
        sets, assigned = [], []
        for start in range(0, tk, self.epoch_tokens):
            x = unit[:, :, start : start + self.epoch_tokens]  # [B, Hkv, L, D]
            w = weight[:, :, start : start + self.epoch_tokens, None]  # [B, 1, L, 1]
            sets.append(centroids)
            nearest = (x @ centroids.transpose(-1, -2)).argmax(-1)  # [B, Hkv, L]
            assigned.append(nearest)
            if start + self.epoch_tokens >= tk:
                break  # no later epoch needs the next set
            for step in range(self.iterations):
                if step:
                    nearest = (x @ centroids.transpose(-1, -2)).argmax(-1)
                total = sums.scatter_add(2, nearest.unsqueeze(-1).expand(-1, -1, -1, d), x * w)
                norm = total.norm(dim=-1, keepdim=True)
                # A cluster no key has joined yet keeps its previous centroid.
                centroids = torch.where(norm > 1e-6, total / norm.clamp(min=1e-6), centroids)
            # The running sums keep the assignment the last refinement was fitted on.
            sums = total
        return torch.stack(sets, dim=2), torch.cat(assigned, dim=2)

    def routes(self, ctx: SelectionContext) -> Routes:
        """Cluster the step's raw keys and summarise each block by its cluster histogram and mean unit key."""
        keys = self.raw_keys(ctx)
        b, hkv, tk, d = keys.shape
        bs, c = self.block_size, self.clusters
        nkb, per_epoch = -(-tk // bs), self.epoch_tokens // bs
        centroids, assigned = self.cluster(keys, ctx.key_mask)  # [B, Hkv, E, C, D], [B, Hkv, Tk]
        epochs = centroids.shape[2]
        pad = epochs * self.epoch_tokens - tk
        weight = _key_weight(ctx.key_mask, b, tk, keys.device)  # [B, 1, Tk]
        # Flat histogram index (block, cluster); padding keys and the last epoch's missing keys weigh 0.
        slot = torch.arange(epochs * self.epoch_tokens, device=keys.device) // bs * c
        slot = slot + torch.nn.functional.pad(assigned, (0, pad))  # [B, Hkv, E * epoch_tokens]
        src = torch.nn.functional.pad(weight, (0, pad)).expand(b, hkv, -1)
        hist = torch.zeros(b, hkv, epochs * per_epoch * c, device=keys.device).scatter_add(2, slot, src)
        hist = hist.view(b, hkv, epochs, per_epoch, c).transpose(-1, -2)  # [B, Hkv, E, C, Nblk / E]
        unit = torch.nn.functional.normalize(keys.float(), dim=-1) * weight.unsqueeze(-1)
        unit = torch.nn.functional.pad(unit, (0, 0, 0, nkb * bs - tk)).view(b, hkv, nkb, bs, d)
        valid = torch.nn.functional.pad(weight, (0, nkb * bs - tk)).view(b, 1, nkb, bs).sum(-1, keepdim=True)
        return Routes(centroids, hist, unit.sum(3) / valid.clamp(min=1))

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


def _key_weight(key_mask: Tensor | None, b: int, tk: int, device: torch.device) -> Tensor:
    """``[B, 1, Tk]`` float32: 1 for a valid key, 0 for padding."""
    if key_mask is None:
        return torch.ones(b, 1, tk, device=device)
    return key_mask.float().view(b, 1, tk)
