"""DuoAttention-style per-head budgets: retrieval heads read everything, streaming heads only sinks + window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from longattn.core.profile import HeadProfile, as_profile, model_identity
from longattn.core.selection import Selection
from longattn.methods.base import Method, SelectionContext
from longattn.ops.block_sparse import block_sparse_attention
from longattn.ops.dense import dense_attention

UNITS = ("kv_head", "query_head")


@dataclass
class Duo(Method):
    """Full attention (or a selector's top-k) for retrieval heads, sinks + local window for the rest.

    Which heads retrieve comes from a :class:`~longattn.core.profile.HeadProfile` (``longattn heads
    profile``), keeping either the heads whose retrieval score reaches ``threshold`` or the top
    ``retrieval_share`` of heads; or from an explicit ``retrieval_heads`` list. By default a unit is a KV
    head (its score is the max over its query heads): a streaming KV head then needs only its sinks and
    window in the cache, which is DuoAttention's memory saving (see :meth:`kv_cache_tokens`).
    Paper: DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads,
    https://arxiv.org/abs/2410.10819
    """

    profile: "HeadProfile | str | Path | None" = None
    """The model's HeadProfile, or the path of its JSON file."""
    retrieval_share: float | None = None
    """Share of units (in (0, 1]) that retrieve: the highest retrieval scores, ties (heads that never copied)
    going to the heads with the lowest streaming score. Exclusive with ``threshold``."""
    threshold: float | None = None
    """Units whose retrieval score is >= this retrieve. Exclusive with ``retrieval_share``."""
    retrieval_heads: tuple[tuple[int, int], ...] | None = None
    """Explicit ``(layer, unit)`` pairs that retrieve, instead of a profile."""
    unit: str = "kv_head"
    """"kv_head" (cache-friendly, DuoAttention) or "query_head" (finer, as in the Retrieval Head study)."""
    selector: str | None = None
    """None: retrieval heads attend densely. Else a scored method's name whose selection they use."""
    selector_config: dict[str, Any] | None = None
    """Options of ``selector`` (its block_size must equal this method's)."""

    name: ClassVar[str] = "duo"
    paper: ClassVar[str] = "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads https://arxiv.org/abs/2410.10819"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(map(repr, UNITS))}, got {self.unit!r}")
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
            self._choose_from_profile(self.profile)
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
        self._selector: Method | None = None
        if self.selector is not None:
            from longattn.methods import get_method

            config = dict(self.selector_config or {})
            if config.setdefault("block_size", self.block_size) != self.block_size:
                raise ValueError(f"selector_config block_size={config['block_size']} must equal block_size="
                                 f"{self.block_size} (one Selection serves every head)")
            if self.selector in ("duo", "razor", "act", "dense", "streaming"):
                raise ValueError(f"selector must be a scored method (moba, quest, ...), got {self.selector!r}")
            self._selector = get_method(self.selector, **config)
            self.summary = self._selector.summary  # type: ignore[misc]  # the session indexes what it scores
        elif self.selector_config is not None:
            raise ValueError("selector_config is given but selector is None")

    def _choose_from_profile(self, profile: HeadProfile) -> None:
        scores = profile.kv_head_scores() if self.unit == "kv_head" else profile.scores()  # [L, units]
        if (self.threshold is None) == (self.retrieval_share is None):
            raise ValueError("with a profile, set exactly one of threshold (a retrieval score in [0, 1]) or "
                             "retrieval_share (a share of heads in (0, 1])")
        for name in ("threshold", "retrieval_share"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.threshold is not None:
            if not 0.0 <= self.threshold <= 1.0:
                raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
            chosen = scores >= self.threshold
        else:
            if not 0.0 < self.retrieval_share <= 1.0:  # type: ignore[operator]
                raise ValueError(f"retrieval_share must lie in (0, 1], got {self.retrieval_share}")
            count = math.ceil(self.retrieval_share * scores.numel())  # type: ignore[operator]
            # Most heads never copy (score 0): among equal retrieval scores, prefer the heads that attend
            # farthest (lowest streaming score: least mass on sinks + window), then by position.
            streaming = profile.scores("streaming")
            if self.unit == "kv_head":
                streaming = streaming.view(profile.num_layers, profile.num_kv_heads, -1).amin(-1)
            by_reach = torch.argsort(streaming.flatten(), stable=True)
            order = by_reach[torch.argsort(scores.flatten()[by_reach], descending=True, stable=True)][:count]
            chosen = torch.zeros(scores.numel(), dtype=torch.bool)
            chosen[order] = True
            chosen = chosen.view_as(scores)
        for layer, unit in chosen.nonzero().tolist():
            self._chosen.setdefault(layer, set()).add(unit)
        self._layout = (profile.num_layers, profile.num_heads, profile.num_kv_heads)

    def check_model(self, model: Any) -> None:
        if isinstance(self.profile, HeadProfile):
            self.profile.check_model(model)
        ident = model_identity(model)
        units = ident["num_kv_heads"] if self.unit == "kv_head" else ident["num_heads"]
        for layer, chosen in self._chosen.items():
            if layer >= ident["num_layers"] or max(chosen) >= units:
                raise ValueError(f"retrieval head ({layer}, {max(chosen)}) does not exist in a model with "
                                 f"{ident['num_layers']} layers x {units} {self.unit}s")

    def retrieval_units(self) -> dict[int, set[int]]:
        """Layer -> the units (KV or query heads, per ``unit``) that retrieve."""
        return {layer: set(units) for layer, units in self._chosen.items()}

    def head_mask(self, layer: int, num_heads: int, num_kv_heads: int, device: torch.device) -> Tensor:
        """``[Hq]`` bool: which query heads of ``layer`` retrieve."""
        if self._layout is not None and (num_heads, num_kv_heads) != self._layout[1:]:
            raise ValueError(
                f"the HeadProfile is for {self._layout[1]} query / {self._layout[2]} KV heads, but this model has "
                f"{num_heads} / {num_kv_heads}; profile this model with `longattn heads profile`"
            )
        units = num_kv_heads if self.unit == "kv_head" else num_heads
        chosen = self._chosen.get(layer, set())
        if chosen and max(chosen) >= units:
            raise ValueError(f"retrieval head ({layer}, {max(chosen)}) does not exist: the layer has {units} "
                             f"{self.unit}s")
        mask = torch.zeros(units, dtype=torch.bool, device=device)
        mask[sorted(chosen)] = True
        return mask.repeat_interleave(num_heads // units) if self.unit == "kv_head" else mask

    def summariser(self) -> "str | Callable[..., Tensor] | None":
        return self._selector.summariser() if self._selector is not None else self.summary

    def q_block_size(self, q_len: int) -> int:
        if self._selector is not None:
            return self._selector.q_block_size(q_len)
        return super().q_block_size(q_len)

    def prepare(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Any:
        return self._selector.prepare(q, summaries, ctx) if self._selector is not None else None

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
        if self._selector is None:
            retrieve = self.causal_block_mask(tq, ctx, qbs)
        else:
            retrieve = self._selector.block_mask(q, summaries, ctx, qbs, prepared)
        return torch.where(heads, retrieve, static).expand(b, hq, -1, -1)

    def fast_attention(
        self, q: Tensor, k: Tensor, v: Tensor, selection: Selection, scale: float, key_mask: Tensor | None,
        ctx: SelectionContext, backend: str = "auto",
    ) -> tuple[Tensor, Tensor] | None:
        """Full KV heads through fused SDPA, the streaming heads through the block-sparse operator.

        The operator over every causal block costs more than SDPA, so the heads that read everything skip it.
        Applies with ``unit="kv_head"`` and no ``selector`` (whole GQA groups are full); otherwise None.
        ``lse`` is NaN on the SDPA heads. Reference: ``block_sparse_attention`` over ``selection``
        (tests/methods/test_duo.py compares them). Shapes as :meth:`Method.fast_attention`.
        """
        full = sorted(self._chosen.get(ctx.layer, set()))
        if self.unit != "kv_head" or self._selector is not None or not full or backend != "auto":
            return None
        hq, hkv = q.shape[1], k.shape[1]
        group = hq // hkv
        stream = [h for h in range(hkv) if h not in full]
        rows = lambda kv: [h * group + i for h in kv for i in range(group)]  # noqa: E731
        out = torch.empty_like(q)
        lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device=q.device)
        out[:, rows(full)] = dense_attention(q[:, rows(full)], k[:, full], v[:, full], scale, key_mask)
        if stream:
            heads = rows(stream) if selection.num_heads == hq else stream
            part = Selection(selection.indices[:, heads], selection.counts[:, heads], selection.q_block_size,
                             selection.kv_block_size)
            out[:, rows(stream)], lse[:, rows(stream)] = block_sparse_attention(
                q[:, rows(stream)], k[:, stream], v[:, stream], part, scale, key_mask=key_mask
            )
        return out, lse

    def kv_cache_tokens(self, kv_len: int, num_layers: int, num_heads: int, num_kv_heads: int) -> int:
        """KV entries (tokens x KV heads, summed over layers) a per-head cache needs for ``kv_len`` tokens.

        A KV head none of whose query heads retrieves keeps only its sink blocks and window (plus the block
        being filled); the others keep everything. Today's Hugging Face cache still stores all ``kv_len``
        tokens for every head: this is the saving a head-aware cache realises.
        """
        bs = self.block_size
        streaming = min(kv_len, -(-self.sink_tokens // bs) * bs + self.window + bs)
        group = num_heads // num_kv_heads
        total = 0
        for layer in range(num_layers):
            chosen = self._chosen.get(layer, set())
            full = len(chosen if self.unit == "kv_head" else {h // group for h in chosen})
            total += full * kv_len + (num_kv_heads - full) * streaming
        return total
