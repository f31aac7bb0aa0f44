"""DuoAttention-style per-head budgets: retrieval heads read everything, streaming heads only sinks + window."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from longattn.core.profile import HeadProfile, as_profile, model_identity
from longattn.core.selection import Selection
from longattn.methods import as_method
from longattn.methods.base import Method, SelectionContext

GRANULARITIES = ("kv_head", "query_head")
# Selectors must score blocks: these only keep a fixed pattern, or wrap another method.
_NOT_SELECTORS = ("duo", "razor", "act", "dense", "streaming")


@dataclass
class Duo(Method):
    """Full attention (or a selector's top-k) for retrieval heads, sinks + local window for the rest.

    Which heads retrieve comes from a :class:`~longattn.core.profile.HeadProfile` (``longattn heads
    profile``), keeping either the heads whose retrieval score reaches ``threshold`` or the top
    ``retrieval_share`` of heads; or from an explicit ``retrieval_heads`` list. By default the choice is per
    KV head (its score is the max over its query heads): a streaming KV head then needs only its sinks and
    window in the cache, which is DuoAttention's memory saving (see :meth:`kv_cache_tokens`). Without a
    ``selector`` the retrieval heads are marked dense in the Selection and the operator runs them through SDPA.
    Paper: DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads,
    https://arxiv.org/abs/2410.10819
    """

    profile: "HeadProfile | str | Path | None" = None
    """The model's HeadProfile, or the path of its JSON file."""
    retrieval_share: float | None = None
    """Share of heads (in (0, 1]; KV or query heads per ``granularity``) that retrieve: the highest retrieval scores, ties (heads that never copied)
    going to the heads with the lowest streaming score. Exclusive with ``threshold``."""
    threshold: float | None = None
    """Heads whose retrieval score is >= this retrieve. Exclusive with ``retrieval_share``."""
    retrieval_heads: tuple[tuple[int, int], ...] | None = None
    """Explicit ``(layer, head)`` pairs that retrieve, instead of a profile (KV or query heads per ``granularity``)."""
    granularity: str = "kv_head"
    """What is chosen: "kv_head" (cache-friendly, DuoAttention) or "query_head" (finer, as in the Retrieval Head
    study)."""
    selector: "Method | str | dict[str, Any] | None" = None
    """None: retrieval heads attend densely. Else the scored method whose selection they use: an instance, a
    name, or ``{"name": ..., **options}``; its ``block_size`` must equal this method's (a name or dict takes it)."""

    name: ClassVar[str] = "duo"
    paper: ClassVar[str] = "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads https://arxiv.org/abs/2410.10819"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}, got "
                             f"{self.granularity!r}")
        sources = [self.profile is not None, self.retrieval_heads is not None]
        if sum(sources) != 1:
            raise ValueError(
                f"{self.name} needs exactly one of profile (a HeadProfile or its path; make one with `longattn "
                "heads profile`) or retrieval_heads (explicit (layer, head) pairs)"
            )
        self._chosen: dict[int, set[int]] = {}
        self._layout: tuple[int, int, int] | None = None  # (layers, query heads, kv heads) the choice is for
        if self.profile is not None:
            self.profile = as_profile(self.profile)
            self._chosen = self.profile.retrieval_heads(self.granularity, self.threshold, self.retrieval_share)
            self._layout = (self.profile.num_layers, self.profile.num_heads, self.profile.num_kv_heads)
        else:
            if self.threshold is not None or self.retrieval_share is not None:
                raise ValueError("threshold and retrieval_share choose heads from a profile; with retrieval_heads "
                                 "leave them unset")
            pairs = self.retrieval_heads
            if not isinstance(pairs, (tuple, list)) or not all(
                isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, int) and x >= 0 for x in p)
                for p in pairs
            ):
                raise ValueError(f"retrieval_heads must be (layer, head) pairs of non-negative ints, got {pairs!r}")
            self.retrieval_heads = tuple((int(a), int(b)) for a, b in pairs)
            for layer, head in self.retrieval_heads:
                self._chosen.setdefault(layer, set()).add(head)
        if self.selector is not None:
            spec = {"name": self.selector} if isinstance(self.selector, str) else self.selector
            if isinstance(spec, dict):
                spec = {"block_size": self.block_size, **spec}
            self.selector = as_method(spec, "selector")
            if self.selector.name in _NOT_SELECTORS:
                raise ValueError(f"selector must be a scored method (moba, quest, ...), got {self.selector.name!r}")
            if self.selector.block_size != self.block_size:
                raise ValueError(f"selector block_size={self.selector.block_size} must equal block_size="
                                 f"{self.block_size} (one Selection serves every head)")

    def check_model(self, model: Any) -> None:
        if isinstance(self.profile, HeadProfile):
            self.profile.check_model(model)
        ident = model_identity(model)
        units = ident["num_kv_heads"] if self.granularity == "kv_head" else ident["num_heads"]
        for layer, chosen in self._chosen.items():
            if layer >= ident["num_layers"] or max(chosen) >= units:
                raise ValueError(f"retrieval head ({layer}, {max(chosen)}) does not exist in a model with "
                                 f"{ident['num_layers']} layers x {units} {self.granularity}s")

    def retrieval_units(self) -> dict[int, set[int]]:
        """Layer -> the heads (KV or query heads, per ``granularity``) that retrieve."""
        return {layer: set(units) for layer, units in self._chosen.items()}

    def head_mask(self, layer: int, num_heads: int, num_kv_heads: int, device: torch.device) -> Tensor:
        """``[Hq]`` bool: which query heads of ``layer`` retrieve (:meth:`retrieving_heads` as a tensor)."""
        return torch.tensor(self.retrieving_heads(layer, num_heads, num_kv_heads), dtype=torch.bool, device=device)

    def retrieving_heads(self, layer: int, num_heads: int, num_kv_heads: int) -> tuple[bool, ...]:
        """One flag per query head of ``layer``: whether it retrieves. Host-side, as ``Selection.dense_heads``."""
        if self._layout is not None and (num_heads, num_kv_heads) != self._layout[1:]:
            raise ValueError(
                f"the HeadProfile is for {self._layout[1]} query / {self._layout[2]} KV heads, but this model has "
                f"{num_heads} / {num_kv_heads}; profile this model with `longattn heads profile`"
            )
        units = num_kv_heads if self.granularity == "kv_head" else num_heads
        chosen = self._chosen.get(layer, set())
        if chosen and max(chosen) >= units:
            raise ValueError(f"retrieval head ({layer}, {max(chosen)}) does not exist: the layer has {units} "
                             f"{self.granularity}s")
        group = num_heads // units  # query heads per chosen unit: 1 for query heads
        return tuple(h // group in chosen for h in range(num_heads))

    def streaming_kv_heads(self, layer: int, num_heads: int, num_kv_heads: int) -> tuple[bool, ...] | None:
        """A KV head none of whose query heads retrieves reads only sinks + window (DuoAttention's saving).
        None with a ``selector`` (it scores every head's block summaries) or a position policy that moves keys."""
        if self.selector is not None or self.position_policy().changes_positions:
            return None
        retrieving = self.retrieving_heads(layer, num_heads, num_kv_heads)
        group = num_heads // num_kv_heads
        return tuple(not any(retrieving[h * group : (h + 1) * group]) for h in range(num_kv_heads))

    def summariser(self) -> "str | Callable[..., Tensor] | None":
        return self.selector.summariser() if isinstance(self.selector, Method) else None

    def query_block_size_for(self, q_len: int) -> int:
        if isinstance(self.selector, Method):
            return self.selector.query_block_size_for(q_len)
        return super().query_block_size_for(q_len)

    def prepare(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Any:
        return self.selector.prepare(q, summaries, ctx) if isinstance(self.selector, Method) else None

    def select(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Selection:
        """:meth:`Method.select`, with the retrieval heads marked dense when they read everything (no
        ``selector``), so that the operator runs them through SDPA. ``q [B, Hq, Tq, D]`` -> ``[B, Hq, Qblk, S]``."""
        selection = super().select(q, summaries, ctx)
        if self.selector is None and self._chosen.get(ctx.layer):
            selection = replace(selection, dense_heads=self.retrieving_heads(ctx.layer, q.shape[1], ctx.num_kv_heads))
        return selection

    def block_mask(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        """Retrieval heads: every causal block (or the selector's); other heads: sinks + window.

        Returns ``[B, Hq, Qblk, Nblk]`` bool.
        """
        b, hq, tq, _ = q.shape
        heads = self.head_mask(ctx.layer, hq, ctx.num_kv_heads, q.device).view(1, hq, 1, 1)
        static = self.static_mask(tq, ctx, qbs)
        if not bool(heads.any()):
            return static.expand(b, hq, -1, -1)
        if self.selector is None:
            retrieve = self.causal_block_mask(tq, ctx, qbs)
        else:
            retrieve = self.selector.block_mask(q, summaries, ctx, qbs, prepared)
        return torch.where(heads, retrieve, static).expand(b, hq, -1, -1)

    def kv_cache_tokens(self, kv_len: int, num_layers: int, num_heads: int, num_kv_heads: int) -> int:
        """KV entries (tokens x KV heads, summed over layers) a per-head cache needs for ``kv_len`` tokens.

        A KV head none of whose query heads retrieves keeps only its sink blocks and window (plus the block
        being filled); the others keep everything. transformers' ``DynamicCache`` stores all ``kv_len`` tokens
        for every head; :class:`longattn.hf.HeadAwareCache` (what ``apply`` gives the model for ``duo``) holds
        this, plus up to ``slack`` tokens per streaming head before it drops them (its ``kv_bytes()`` measures).
        """
        bs = self.block_size
        streaming = min(kv_len, -(-self.sink_tokens // bs) * bs + self.window + bs)
        group = num_heads // num_kv_heads
        total = 0
        for layer in range(num_layers):
            chosen = self._chosen.get(layer, set())
            full = len(chosen if self.granularity == "kv_head" else {h // group for h in chosen})
            total += full * kv_len + (num_kv_heads - full) * streaming
        return total
