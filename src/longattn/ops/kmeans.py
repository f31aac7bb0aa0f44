"""Causal online spherical k-means over epochs of keys (the Routing Transformer's clustering, training-free).

Keys are clustered in epochs of ``epoch_tokens``: epoch ``e``'s keys are assigned to centroid set ``e``, which
is fitted only on the keys of earlier epochs, so no key's cluster depends on a later key. That makes the
clustering extendable: keys appended inside the last epoch are assigned against a set that no longer changes,
which is what lets a decode step assign only its new key (:func:`assign`) instead of clustering the cache again.
"""

from __future__ import annotations

import torch
from torch import Tensor


def key_weight(key_mask: Tensor | None, b: int, tk: int, device: torch.device) -> Tensor:
    """``[B, 1, Tk]`` float32: 1 for a valid key, 0 for padding (``key_mask [B, Tk]`` bool, or None: all valid)."""
    if key_mask is None:
        return torch.ones(b, 1, tk, device=device)
    return key_mask.float().view(b, 1, tk)


def causal_spherical_kmeans(
    keys: Tensor, key_mask: Tensor | None, clusters: int, epoch_tokens: int, iterations: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Cluster ``keys [B, Hkv, Tk, D]`` epoch by epoch; padding keys (``key_mask [B, Tk]`` False) move no centroid.

    Set ``e + 1`` adds epoch ``e``'s keys to the running per-cluster sums (``iterations`` Lloyd steps on them,
    warm-started from set ``e``); set 0 is ``clusters`` random unit vectors drawn from ``seed`` (the same for every
    head and batch row). Cost ``O(Tk * clusters * D * iterations)``.

    Returns:
        Centroid sets ``[B, Hkv, E, C, D]`` float32 unit vectors (E = epochs holding keys) and each key's cluster
        in its epoch's set, ``[B, Hkv, Tk]`` int64.
    """
    b, h, tk, d = keys.shape
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    weight = key_weight(key_mask, b, tk, keys.device)  # [B, 1, Tk]
    gen = torch.Generator().manual_seed(seed)
    first = torch.nn.functional.normalize(torch.randn(clusters, d, generator=gen), dim=-1)
    centroids = first.to(keys.device).expand(b, h, -1, -1)
    sums = torch.zeros(b, h, clusters, d, device=keys.device)
    sets, assigned = [], []
    for start in range(0, tk, epoch_tokens):
        x = unit[:, :, start : start + epoch_tokens]  # [B, Hkv, L, D]
        w = weight[:, :, start : start + epoch_tokens, None]  # [B, 1, L, 1]
        sets.append(centroids)
        nearest = (x @ centroids.transpose(-1, -2)).argmax(-1)  # [B, Hkv, L]
        assigned.append(nearest)
        if start + epoch_tokens >= tk:
            break  # no later epoch needs the next set
        for step in range(iterations):
            if step:
                nearest = (x @ centroids.transpose(-1, -2)).argmax(-1)
            total = sums.scatter_add(2, nearest.unsqueeze(-1).expand(-1, -1, -1, d), x * w)
            norm = total.norm(dim=-1, keepdim=True)
            # A cluster no key has joined yet keeps its previous centroid.
            centroids = torch.where(norm > 1e-6, total / norm.clamp(min=1e-6), centroids)
        # The running sums keep the assignment the last refinement was fitted on.
        sums = total
    return torch.stack(sets, dim=2), torch.cat(assigned, dim=2)


def assign(keys: Tensor, centroids: Tensor) -> Tensor:
    """The nearest of ``centroids [B, Hkv, C, D]`` (unit) for each of ``keys [B, Hkv, n, D]``: ``[B, Hkv, n]``
    int64, as :func:`causal_spherical_kmeans` assigns the keys of an epoch to that epoch's set."""
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    return (unit @ centroids.transpose(-1, -2)).argmax(-1)
