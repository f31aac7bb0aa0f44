"""InfLLM: key blocks are represented by the few keys that their own queries attended most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

from longattn.core.checks import check_int
from longattn.methods.base import group_queries
from longattn.methods.topk import TopKMethod


@dataclass(frozen=True)
class RepresentativeSummary:
    """The ``count`` keys of a block that the block's own later queries score highest (InfLLM's representative
    tokens). Key ``m`` scores the mean of ``q_i · k_m`` over the block's queries ``i >= m`` and over the query
    heads reading its KV head; without queries (a cache indexed after the fact) the keys stand in for them.
    """

    count: int
    uses_queries: bool = True

    def __call__(self, blocks: Tensor, queries: Tensor | None) -> Tensor:
        """``blocks [B, Hkv, N, L, D]``, ``queries [B, Hq, N, L, D]`` or None -> ``[B, Hkv, N, count, D]`` float32."""
        k = blocks.float()
        b, hkv, n, length, d = k.shape
        if queries is None:
            q = k.unsqueeze(2)  # [B, Hkv, 1, N, L, D]
        else:
            q = queries.float().view(b, hkv, -1, n, length, d)  # [B, Hkv, G, N, L, D]
        scores = torch.einsum("bhgnid,bhnmd->bhnim", q, k) / q.shape[2]  # [B, Hkv, N, L(i), L(m)]
        later = torch.ones(length, length, dtype=torch.bool, device=k.device).tril()  # i >= m
        scores = (scores * later).sum(dim=3) / later.sum(dim=0)  # mean over i >= m: [B, Hkv, N, L]
        top = scores.topk(min(self.count, length), dim=-1).indices  # [B, Hkv, N, r]
        if top.shape[-1] < self.count:  # a partial block shorter than count: repeat its best key
            top = torch.cat((top, top[..., :1].expand(*top.shape[:-1], self.count - top.shape[-1])), dim=-1)
        return k.gather(3, top.unsqueeze(-1).expand(-1, -1, -1, -1, d))


@dataclass
class InfLLM(TopKMethod):
    """InfLLM stores the context in blocks and represents each block by a few representative keys: the keys
    that received the most attention from the block's own queries when the block was formed. A query scores a
    block by its mean dot product with the representatives and attends the ``top_k`` blocks besides the
    sinks and the local window (InfLLM's "initial tokens" and "local tokens"). Representatives catch the one
    salient token of a block that a mean dilutes. Paper: InfLLM, https://arxiv.org/abs/2402.04617
    """

    block_size: int = 16
    """Tokens per memory block (the paper uses 128 on 7B models; 16 selects better on small ones)."""
    window: int = 128
    top_k: int = 32
    """Memory blocks retrieved per query block (32 x 16 = 512 tokens) beyond the sinks and the window."""
    representatives: int = 4
    """Representative keys per block, 1..block_size."""

    name: ClassVar[str] = "infllm"
    paper: ClassVar[str] = (
        "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context Memory "
        "https://arxiv.org/abs/2402.04617"
    )
    summary: ClassVar[str | None] = "representatives"
    rotatable_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("representatives", self.representatives, 1)
        if self.representatives > self.block_size:
            raise ValueError(
                f"representatives must lie in [1, block_size={self.block_size}], got {self.representatives}"
            )

    def summariser(self) -> Callable[..., Tensor]:
        return RepresentativeSummary(self.representatives)

    def score(self, q: Tensor, summaries: Tensor) -> Tensor:
        """``q [B, Hq, Tq, D]``, summaries ``[B, Hkv, Nblk, r, D]`` -> ``[B, Hq, Tq, Nblk]``."""
        b, hq, tq, _ = q.shape
        g = group_queries(q, summaries.shape[1])  # [B, Hkv, G, Tq, D]
        # Mean of dot products = dot product with the mean of the representatives: one matmul.
        s = torch.einsum("bhgtd,bhnd->bhgtn", g, summaries.mean(dim=3))
        return s.reshape(b, hq, tq, -1)
