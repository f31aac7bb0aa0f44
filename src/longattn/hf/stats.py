"""What a session counts and who watches it: attention work per step (density) and the observer contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from longattn.core.selection import Selection


@dataclass
class AttentionStats:
    """Attention work since the session began (or the last reset), summed over layers, heads and batch.

    Attributes:
        computed_pairs: query-key pairs the selections covered (causal part only).
        causal_pairs: query-key pairs dense causal attention would compute for the same steps.
        calls: attention calls (layers x forward passes).
    """

    causal_pairs: int = 0
    calls: int = 0
    _counted: int = field(default=0, repr=False)
    # Counts still on the device: reading them back every layer would stall a GPU once per call.
    _pending: list[Tensor] = field(default_factory=list, repr=False)

    @property
    def computed_pairs(self) -> int:
        if self._pending:
            self._counted += int(torch.stack(self._pending).sum())
            self._pending.clear()
        return self._counted

    def add_pairs(self, pairs: "int | Tensor") -> None:
        """Count ``pairs`` computed pairs: an int, or a 0-d int64 tensor read only when asked for."""
        if isinstance(pairs, Tensor):
            self._pending.append(pairs)
            if len(self._pending) >= 1024:  # fold on the device, still without a sync
                self._pending[:] = [torch.stack(self._pending).sum()]
        else:
            self._counted += int(pairs)

    @property
    def density(self) -> float:
        """Share of causal query-key pairs computed (1.0 = dense)."""
        return self.computed_pairs / self.causal_pairs if self.causal_pairs else float("nan")

    def reset(self) -> None:
        self._counted = self.causal_pairs = self.calls = 0
        self._pending.clear()


Observer = Callable[[int, Tensor, Tensor, Selection, float, "Tensor | None"], None]
"""Called as ``observer(layer, q, k, selection, scale, key_mask)`` at every attention call of a session, with
``q [B, Hq, Tq, D]`` and ``k [B, Hkv, Tk, D]`` post-RoPE (e.g. :class:`longattn.analysis.RecallRecorder`). An
observer with an ``observe_output`` method is also called as ``observe_output(layer, q, k, v, out, scale,
key_mask)`` with the layer's final output ``out [B, Hq, Tq, D]`` (after any compensation)."""
