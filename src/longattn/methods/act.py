"""ACT-style attention calibration around any method: damp the hidden attention sinks, keep the rest."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from longattn.core.profile import HeadProfile, as_profile
from longattn.core.selection import Selection
from longattn.methods import as_method
from longattn.methods.base import Method, SelectionContext
from longattn.ops.sampled import sample_positions, sampled_attention, sink_ratio

# Membership of sinks in a chunk of query blocks' selections is [B, H, Qblk, S, sinks]: bounded per chunk.
_CHUNK_ELEMENTS = 1 << 24
_MIRRORED = ("block_size", "sink_tokens", "window", "query_block_size")


@dataclass
class ACT(Method):
    """Wrap ``base``: in each calibrated head, find the step's hidden sinks and scale their attention down.

    A hidden sink is a token after the first ``keep_initial`` that receives at least ``threshold`` times the
    uniform share of attention from queries farther than ``min_distance`` away (measured on up to
    ``probe_queries`` rows of the step, dense, so the sinks do not depend on what ``base`` selects). Its
    attention is multiplied by ``factor`` and the removed mass goes to the other attended tokens in
    proportion to their attention (ACT's rule), so every row still sums to one. With a ``profile``, only the
    heads whose profiled hidden-sink mass reaches ``min_sink_mass`` are calibrated; without one, every head.
    ``block_size``, ``window``, ``sink_tokens`` and ``query_block_size`` are ``base``'s (set them on ``base``). Cost: one dense score row per probe query and head, so calibration does not save work.
    The sinks are found per step, as ACT does per input: in a one-shot prefill the probe rows span the whole
    prompt, so an early row may be calibrated for a sink that later rows revealed (never for a key it cannot
    attend), and a prefill split into chunks finds its sinks chunk by chunk.
    Paper: Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training
    through Attention Calibration, https://arxiv.org/abs/2406.15765
    """

    base: "Method | str | dict[str, Any]" = "dense"
    """The wrapped method: an instance, a registered name (its defaults), or ``{"name": ..., **options}``;
    any method but act. Its dense heads run through the block-sparse operator, which gives the log-sum-exp
    the calibration reads."""
    factor: float = 0.4
    """Multiplier of a hidden sink's attention, in [0, 1]; 1 leaves attention unchanged."""
    threshold: float = 5.0
    """A token is a sink when it takes >= this many times the uniform share (> 1)."""
    keep_initial: int = 4
    """The first tokens (the usual, useful sinks) are never calibrated."""
    min_distance: int = 64
    """Only attention from queries farther than this counts towards a sink (every near key is "above uniform")."""
    probe_queries: int = 64
    """Query rows of each step whose dense attention finds the sinks."""
    max_sinks: int = 8
    """At most this many sinks per head and step (the strongest)."""
    profile: "HeadProfile | str | Path | None" = None
    """Optional HeadProfile: calibrate only heads whose ``hidden_sink_mass`` >= ``min_sink_mass``."""
    min_sink_mass: float = 0.05
    """With a profile: the hidden-sink mass a head needs to be calibrated."""

    name: ClassVar[str] = "act"
    paper: ClassVar[str] = "ACT: Unveiling and Harnessing Hidden Attention Sinks https://arxiv.org/abs/2406.15765"
    adjusts_output: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.base = as_method(self.base, "base")
        if isinstance(self.base, ACT):
            raise ValueError(f"base must be a method other than act, got {self.base.name!r}")
        defaults = {f.name: f.default for f in fields(Method)}
        for name in _MIRRORED:
            mine, theirs = getattr(self, name), getattr(self.base, name)
            if mine != defaults[name] and mine != theirs:
                raise ValueError(f"{name}={mine!r} conflicts with base {self.base.name!r}'s {name}={theirs!r}; "
                                 f"set it on base")
            setattr(self, name, theirs)
        super().__post_init__()
        if not isinstance(self.factor, (int, float)) or not 0.0 <= self.factor <= 1.0:
            raise ValueError(f"factor must lie in [0, 1], got {self.factor!r}")
        if not isinstance(self.threshold, (int, float)) or not self.threshold > 1.0:
            raise ValueError(f"threshold must be a number > 1 (times the uniform share), got {self.threshold!r}")
        for name, low in (("keep_initial", 0), ("min_distance", 0), ("probe_queries", 1), ("max_sinks", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0.0 <= self.min_sink_mass <= 1.0:
            raise ValueError(f"min_sink_mass must lie in [0, 1], got {self.min_sink_mass!r}")
        self._heads: Tensor | None = None
        if self.profile is not None:
            self.profile = as_profile(self.profile)
            self._heads = self.profile.scores("hidden_sink_mass") >= self.min_sink_mass  # [L, Hq]

    # Selection is entirely base's.
    def summariser(self) -> "str | Callable[..., Tensor] | None":
        return self.base.summariser()

    def query_block_size_for(self, q_len: int) -> int:
        return self.base.query_block_size_for(q_len)

    def select(self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext) -> Selection:
        """base's Selection, without dense heads: the calibration reads the lse of every head."""
        return self.base.select(q, summaries, ctx).without_dense_heads()

    def block_mask(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        return self.base.block_mask(q, summaries, ctx, qbs, prepared)

    def check_model(self, model: Any) -> None:
        self.base.check_model(model)
        if isinstance(self.profile, HeadProfile):
            self.profile.check_model(model)

    def calibrated_heads(self, layer: int, num_heads: int, device: torch.device) -> Tensor:
        """``[Hq]`` bool: the heads of ``layer`` that are calibrated."""
        if self._heads is None:
            return torch.ones(num_heads, dtype=torch.bool, device=device)
        if layer >= self._heads.shape[0] or num_heads != self._heads.shape[1]:
            raise ValueError(f"the HeadProfile has {self._heads.shape[0]} layers x {self._heads.shape[1]} heads; "
                             f"layer {layer} with {num_heads} heads is not in it (profile this model)")
        return self._heads[layer].to(device)

    def find_sinks(self, q: Tensor, k: Tensor, ctx: SelectionContext, scale: float) -> Tensor:
        """Hidden sinks of every head from the step's probe rows: ``[B, Hq, max_sinks]`` int64, -1 padded.

        ``q [B, Hq, Tq, D]``, ``k [B, Hkv, Tk, D]``.
        """
        tq, tk = q.shape[2], k.shape[2]
        rows = sample_positions(tq, self.probe_queries, q.device)
        positions = tk - tq + rows
        probs = sampled_attention(q, k, scale, rows, ctx.key_mask)  # [B, Hq, n, Tk]
        ratio = sink_ratio(probs, positions, self.min_distance)  # [B, Hq, Tk]
        ratio = ratio.masked_fill(torch.arange(tk, device=q.device) < self.keep_initial, 0.0)
        top, where = ratio.topk(min(self.max_sinks, tk), dim=-1)
        return torch.where(top >= self.threshold, where, torch.full_like(where, -1))

    def adjust_output(
        self, out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, selection: Selection, ctx: SelectionContext,
        scale: float,
    ) -> Tensor:
        """``out [B, Hq, Tq, D]`` with ACT's calibration applied in the calibrated heads.

        With ``p_j`` the attention a row gives sink ``j`` (``exp(q . k_j * scale - lse)``, zero where ``j`` is
        not attended), ``S = sum_j p_j`` and ``o_S = sum_j p_j v_j``: the sinks keep ``factor * p_j`` and the
        other tokens are scaled by ``(1 - factor S) / (1 - S)``, so
        ``out' = factor o_S + (1 - factor S) / (1 - S) (out - o_S)``.
        """
        if self.base.adjusts_output:
            out = self.base.adjust_output(out, lse, q, k, v, selection, ctx, scale)
        b, hq, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        heads = self.calibrated_heads(ctx.layer, hq, q.device)
        if self.factor == 1.0 or not bool(heads.any()):
            return out
        sinks = self.find_sinks(q, k, ctx, scale)  # [B, Hq, m]
        valid = sinks >= 0
        if not bool(valid.any()):
            return out
        at = sinks.clamp(min=0)
        kv_head = torch.arange(hq, device=q.device) // (hq // hkv)
        gather = lambda x: x[torch.arange(b).view(-1, 1, 1), kv_head.view(1, -1, 1), at].float()  # noqa: E731
        ks, vs = gather(k), gather(v)  # [B, Hq, m, D]
        member = self._attended(selection, sinks, tq, tk, hq)  # [B, Hq, Tq, m]
        p = torch.exp(torch.einsum("bhtd,bhmd->bhtm", q.float(), ks) * scale - lse.unsqueeze(-1))
        p = torch.where(member & valid.unsqueeze(2), p, torch.zeros_like(p))
        mass = p.sum(-1, keepdim=True).clamp(max=1.0 - 1e-6)  # [B, Hq, Tq, 1]
        o_s = torch.einsum("bhtm,bhmd->bhtd", p, vs)
        calibrated = self.factor * o_s + (1 - self.factor * mass) / (1 - mass) * (out.float() - o_s)
        return torch.where(heads.view(1, hq, 1, 1), calibrated.to(out.dtype), out)

    def _attended(self, selection: Selection, sinks: Tensor, tq: int, tk: int, hq: int) -> Tensor:
        """Whether each query row attends each sink (selected block, causal): ``[B, Hq, Tq, m]`` bool."""
        qbs, bs = selection.query_block_size, selection.kv_block_size
        idx = selection.indices
        if idx.shape[1] != hq:  # a per-KV-head selection serves each group of query heads
            idx = idx.repeat_interleave(hq // idx.shape[1], dim=1)
        blocks = (sinks // bs).unsqueeze(2).unsqueeze(3)  # [B, Hq, 1, 1, m]
        step = max(1, _CHUNK_ELEMENTS // max(1, idx.shape[0] * hq * idx.shape[-1] * sinks.shape[-1]))
        parts = [(idx[:, :, i : i + step].unsqueeze(-1) == blocks).any(3) for i in range(0, idx.shape[2], step)]
        member = torch.cat(parts, dim=2).repeat_interleave(qbs, dim=2)[:, :, :tq]  # [B, Hq, Tq, m]
        rows = (tk - tq + torch.arange(tq, device=sinks.device)).view(1, 1, -1, 1)
        return member & (sinks.unsqueeze(2) <= rows)
