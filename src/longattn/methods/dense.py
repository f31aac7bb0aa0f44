"""Dense causal attention expressed as a Selection: every block up to the diagonal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from longattn.methods.base import Method, SelectionContext


@dataclass
class Dense(Method):
    """Full causal attention, the baseline every method is measured against (PyTorch SDPA by default).

    As a Selection it keeps every causal block, which through the block-sparse operator must reproduce
    ``scaled_dot_product_attention``; ``sink_tokens`` and ``window`` have no effect because everything is kept.
    """

    use_sdpa: bool = True
    """Compute with PyTorch SDPA (the fast dense kernel, the honest baseline for speed-ups); False routes
    through the block-sparse operator with every block selected, the check that the operator is exact."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.use_sdpa, bool):
            raise ValueError(f"use_sdpa must be a bool, got {self.use_sdpa!r}")

    name: ClassVar[str] = "dense"
    paper: ClassVar[str] = "Attention Is All You Need (Vaswani et al., 2017) https://arxiv.org/abs/1706.03762"

    def block_mask(
        self, q: Tensor, summaries: Tensor | None, ctx: SelectionContext, qbs: int, prepared: Any = None
    ) -> Tensor:
        b, hq, tq, _ = q.shape
        return self.causal_block_mask(tq, ctx, qbs).expand(b, hq, -1, -1)
