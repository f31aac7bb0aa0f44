"""Dense attention of a few sampled query rows: the measurement behind recall, head profiles, ACT and FlexPrefill.

Every function here works on ``n`` sampled rows, so its cost is ``[n, Tk]`` per head, never ``[Tq, Tk]``; the
last three turn such rows into per-block mass, the smallest set covering a share of it, and the distance
between two such distributions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_positions(q_len: int, num: int, device: torch.device | str = "cpu") -> Tensor:
    """``num`` query rows evenly spread over ``[0, q_len)``, always including the last one: ``[n]`` int64.

    The rows are ``(i + 1) * q_len // num - 1``, so early rows (which every method sees densely, their whole
    past sits in the local window) are no more frequent than late ones. Fewer rows come back when ``q_len < num``.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    rows = (torch.arange(1, num + 1, device=device) * q_len) // num - 1
    return rows.clamp(min=0).unique()


def sampled_attention(q: Tensor, k: Tensor, scale: float, rows: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Dense causal softmax of a few query rows over every key.

    Args:
        q: ``[B, Hq, Tq, D]`` post-RoPE queries; row ``i`` sits at absolute position ``Tk - Tq + i``.
        k: ``[B, Hkv, Tk, D]`` post-RoPE keys (``Hq`` a multiple of ``Hkv``; K is never repeated in memory).
        rows: ``[n]`` int64 query rows.
        key_mask: optional ``[B, Tk]`` bool, False on padding keys.

    Returns:
        ``[B, Hq, n, Tk]`` float32 probabilities (zero on future and padding keys).
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if k.dim() != 4 or k.shape[0] != b or k.shape[-1] != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not fit [B, Hq, Tq, D] / [B, Hkv, Tk, D]")
    if rows.dim() != 1 or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= tq)):
        raise ValueError(f"rows must be a 1-D tensor of query rows in [0, {tq})")
    g = hq // hkv
    qs = q[:, :, rows].float().view(b, hkv, g, -1, d)
    scores = torch.einsum("bkgnd,bktd->bkgnt", qs, k.float()).reshape(b, hq, -1, tk) * scale
    pos = (tk - tq + rows).view(1, 1, -1, 1)
    allowed = torch.arange(tk, device=q.device).view(1, 1, 1, -1) <= pos
    if key_mask is not None:
        allowed = allowed & key_mask.view(b, 1, 1, tk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def local_mass(probs: Tensor, positions: Tensor, sink_tokens: int, window: int) -> Tensor:
    """Share of each row's attention on the first ``sink_tokens`` keys plus the ``window`` keys before it.

    Args:
        probs: ``[B, H, n, Tk]`` attention rows; positions: ``[n]`` their absolute positions.

    Returns:
        ``[B, H, n]`` float32 in ``[0, 1]``.
    """
    keys = torch.arange(probs.shape[-1], device=probs.device).view(1, -1)
    pos = positions.view(-1, 1)
    kept = (keys < sink_tokens) | ((keys <= pos) & (keys >= pos - window))  # [n, Tk]
    return (probs * kept).sum(-1)


def far_ratio_sums(probs: Tensor, positions: Tensor, min_distance: int) -> tuple[Tensor, Tensor]:
    """The two sums behind the sink ratio, so chunks of rows can be accumulated.

    Only rows farther than ``min_distance`` from a key count for it: every key near a query gets more than
    the uniform share ``1 / (position + 1)``, which says nothing about sinks.

    Args:
        probs: ``[..., n, Tk]`` causal attention rows; positions: ``[n]`` their absolute positions.

    Returns:
        ``sums [..., Tk]`` (attention x (position + 1), summed over the far rows) and ``rows [Tk]`` int64
        (how many rows are far from each key).
    """
    keys = torch.arange(probs.shape[-1], device=probs.device).view(1, -1)
    far = keys < (positions - min_distance).view(-1, 1)  # [n, Tk]
    sums = (probs * far * (positions.float() + 1).view(-1, 1)).sum(-2)
    return sums, far.sum(0)


def sink_ratio(probs: Tensor, positions: Tensor, min_distance: int = 0) -> Tensor:
    """Mean over the far rows of each key's attention relative to the uniform share ``1 / (position + 1)``.

    ``probs [..., n, Tk]``, ``positions [n]`` -> ``[..., Tk]`` float32: 1.0 is uniform, a sink takes many
    times that; keys no row sees from farther than ``min_distance`` get 0.
    """
    sums, rows = far_ratio_sums(probs, positions, min_distance)
    return sums / rows.clamp(min=1)


def last_row_argmax(q: Tensor, k: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Key position each head attends most from the step's last query: ``[B, Hq]`` int64.

    ``q [B, Hq, Tq, D]``, ``k [B, Hkv, Tk, D]``; the scale does not change an argmax.
    """
    b, hq, _, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scores = torch.einsum("bkgd,bktd->bkgt", q[:, :, -1].float().view(b, hkv, hq // hkv, d), k.float())
    scores = scores.reshape(b, hq, tk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.view(b, 1, tk), float("-inf"))
    return scores.argmax(-1)


# ------------------------------------------------- attention mass: block sums, coverage, distribution distance


def mass_cover(weights: Tensor, gamma: float, at_least: int = 1) -> Tensor:
    """The fewest entries of each row, heaviest first, whose share of the row's total reaches ``gamma``
    (and at least ``at_least`` of them); entries tied with the lightest kept one are kept too.

    Args:
        weights: ``[..., N]`` non-negative float.

    Returns:
        ``[..., N]`` bool.
    """
    ordered = weights.sort(dim=-1, descending=True).values
    total = ordered.sum(-1, keepdim=True)
    # An entry is needed while the heavier ones before it still fall short of gamma; the first always is.
    needed = ((ordered.cumsum(-1) - ordered) < gamma * total).sum(-1, keepdim=True)
    needed = needed.clamp(min=max(at_least, 1), max=weights.shape[-1])
    # A threshold instead of scattering the sorted ranks back: one comparison over the row.
    return weights >= ordered.gather(-1, needed - 1)


def block_sums(x: Tensor, block_size: int) -> Tensor:
    """Sum over each key block: ``[B, H, Tk] -> [B, H, ceil(Tk / block_size)]``."""
    pad = -x.shape[-1] % block_size
    x = torch.nn.functional.pad(x, (0, pad))
    return x.view(*x.shape[:-1], -1, block_size).sum(-1)


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon distance (square root of the divergence, nats) of distributions ``[..., N]`` -> ``[...]``."""
    m = (p + q) / 2
    # xlogy makes 0 * log 0 = 0, where one distribution has no mass.
    kl_p = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_q = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return (0.5 * (kl_p + kl_q)).clamp_min(0.0).sqrt()
