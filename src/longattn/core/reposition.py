"""A position policy bound to a model's RoPE and a method's local window: what the operator applies.

:class:`Reposition` turns a :class:`~longattn.core.positions.PositionPolicy` into shifts of concrete key and
query positions, rotates by a cached table of integer shifts (the same contract as
:func:`~longattn.core.rope.rotate`), caps the distance at which far blocks are scored, and refuses a plan that
would show a key beyond the trained window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from longattn.core.pattern import window_first_block
from longattn.core.positions import PositionPolicy, SelfExtend
from longattn.core.rope import Rope, _angle


@dataclass(frozen=True)
class Reposition:
    """A policy bound to a model's RoPE and a method's local window: what the operator applies.

    Attributes:
        policy: the position policy.
        rope: the model's inverse frequencies and trained window.
        window: tokens before each query block whose keys keep exact distances (the method's ``window``).
    """

    policy: PositionPolicy
    rope: Rope
    window: int
    # cos / sin of every integer shift in [-reach, reach]: [2 * reach + 1, D / 2] each. Shifts are integers, so
    # a table lookup replaces a sine and a cosine per element (measured: the trigonometry cost as much as the
    # attention itself at 16k tokens).
    _table: dict[str, Tensor] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Sizes a policy leaves to the model (DCA's chunk) are fixed once, here, from its trained window.
        object.__setattr__(self, "policy", self.policy.for_window(self.rope.trained_window))

    def rotate(self, x: Tensor, delta: Tensor) -> Tensor:
        """Same contract as :func:`rotate` with this model's ``inv_freq``, from a cached table of integer shifts.

        ``x [..., n, D]``, ``delta [..., n]`` integer (broadcastable) -> ``[..., n, D]`` in ``x``'s dtype.
        """
        reach = int(delta.abs().max()) if delta.numel() else 0
        cos, sin = self._trig(reach, x.device)
        at = delta.long() + (cos.shape[0] // 2)
        c, s = cos[at], sin[at]  # [..., n, D / 2], often one row per block: small
        h = x.shape[-1] // 2
        xf = x.float()
        x1, x2 = xf[..., :h], xf[..., h:]
        # Written into the two halves of one output (no concatenation copy); c and s broadcast at their own,
        # often per-block, shape.
        out = torch.empty(torch.broadcast_shapes(xf.shape, (*c.shape[:-1], 2 * h)), device=x.device)
        torch.mul(x1, c, out=out[..., :h]).addcmul_(x2, s, value=-1.0)
        torch.mul(x2, c, out=out[..., h:]).addcmul_(x1, s)
        return out.to(x.dtype)

    def _trig(self, reach: int, device: torch.device) -> tuple[Tensor, Tensor]:
        table = self._table
        if "cos" not in table or table["cos"].shape[0] // 2 < reach or table["cos"].device != device:
            size = max(reach, 2 * (table["cos"].shape[0] // 2) if "cos" in table else 4096)
            angle = _angle(torch.arange(-size, size + 1), self.rope.inv_freq)
            table["cos"], table["sin"] = angle.cos().to(device), angle.sin().to(device)
        return table["cos"], table["sin"]

    @property
    def score_cap(self) -> int:
        """The distance far blocks are scored at (the policy's ``score_cap``, default half the trained window)."""
        return self.policy.score_cap or self.rope.trained_window // 2

    def capped_scores(
        self, score: Callable[[Tensor, Tensor], Tensor], q: Tensor, summaries: Tensor, scores: Tensor, q_offset: int,
        block_size: int,
    ) -> Tensor:
        """Replace the scores of blocks farther than :attr:`score_cap` by their scores at that distance.

        Args:
            score: the method's ``score(q, summaries) -> [B, Hq, Tq, Nblk]``.
            q: ``[B, Hq, Tq, D]`` post-RoPE queries at positions ``q_offset + t``.
            summaries: ``[B, Hkv, Nblk, R, D]`` summaries of post-RoPE keys (means, pooled keys, representatives).
            scores: ``[B, Hq, Tq, Nblk]`` ``score(q, summaries)`` at real positions.

        Returns:
            ``[B, Hq, Tq, Nblk]``: real scores for blocks within the cap, capped-distance scores beyond it.
        """
        tq, nblk = q.shape[2], summaries.shape[2]
        cap = self.score_cap
        at = q_offset + torch.arange(tq, device=q.device)
        centre = torch.arange(nblk, device=q.device) * block_size + block_size // 2
        far = (at.view(-1, 1) - centre.view(1, -1)) > cap  # [Tq, Nblk]
        if not bool(far.any()):
            return scores
        # Query to position `cap`, each summary from its block's centre to 0: every pair at distance `cap`.
        moved_q = self.rotate(q, (cap - at).view(1, 1, tq))
        moved_s = self.rotate(summaries, (-centre).view(1, 1, nblk, 1).expand(1, 1, nblk, summaries.shape[3]))
        return torch.where(far, score(moved_q, moved_s), scores)

    def shifted_keys(self, k: Tensor, start: int = 0) -> Tensor | None:
        """``k [B, Hkv, Tk, D]`` (the keys at positions ``start ..``) with the policy's per-token shift applied
        to every key (far keys are gathered from it), or None when the policy has no per-token shift."""
        positions = start + torch.arange(k.shape[2], device=k.device)
        shift = self.policy.token_shift(positions)
        return None if shift is None else self.rotate(k, shift)

    def plan(
        self, idx: Tensor, pos: Tensor, rows: Tensor, bs: int, valid: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Far blocks and the per-block and query shifts of one chunk of query blocks.

        Args:
            idx: ``[B, H, C, W]`` int64 selected key blocks (-1 padding); pos: ``[B, H, C, W, bs]`` int64 token
                positions; rows: ``[C, R]`` int64 query-row positions (row 0 of a block is its first query);
                valid: ``[B, H, C, W, bs]`` bool keys that are attended at all.

        Returns:
            ``far [B, H, C, W, 1]`` bool, ``block_shift [B, H, C, W, 1]`` int64 (0 on near blocks) or None, and
            ``query_shift [C, R]`` int64 or None. Raises ``ValueError`` when a far key would be seen farther
            than the trained window.
        """
        first = rows[:, 0]
        lo = window_first_block(first, self.window, bs)  # [C], the window core.pattern keeps
        far_blocks = (idx >= 0) & (idx < lo.view(1, 1, -1, 1))
        far = far_blocks.unsqueeze(-1)
        block = self.policy.block_shift(idx, far_blocks, lo, bs)
        if block is not None:
            block = torch.where(far, block, 0)
        query = self.policy.query_shift(rows, lo, self.window, bs)
        seen = far & valid
        # `original` moves nothing: real distances past the window are the caller's choice, as without longattn.
        if self.policy.changes_positions and bool(seen.any()):
            shift = self.policy.token_shift(pos)
            key_at = pos if shift is None else pos + shift
            if block is not None:
                key_at = key_at + block
            q_at = rows if query is None else rows + query
            k_first = torch.where(seen, key_at, torch.iinfo(torch.int64).max).amin(dim=(0, 1, 3, 4))
            farthest = int((q_at.amax(dim=1) - k_first).max())
            if farthest >= self.rope.trained_window:
                raise ValueError(self._too_far(farthest, int(rows.max()) + 1))
        return far, block, query

    def _too_far(self, farthest: int, length: int) -> str:
        p = self.policy
        if isinstance(p, SelfExtend):
            need = -(-length // max(1, self.rope.trained_window - self.window - 1))
            fix = f"raise SelfExtend(group_size=...) to at least {need}"
        else:
            fix = "lower the method's budget (top_k, window, sink_tokens) below the trained window"
        return (
            f"positions={p.name!r} would show keys at distance {farthest}, beyond the model's trained window of "
            f"{self.rope.trained_window} at {length} tokens; {fix}"
        )
