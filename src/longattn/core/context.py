"""SelectionContext: what a method may know about a step besides its queries.

The session (``longattn.hf``) builds one per layer call from what the whole step shares (the resolved
backend, the step's pattern cache); methods read it. It lives in ``core`` because both sides use it and it
holds only core types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from longattn.core.kv import SplitKV
from longattn.core.pattern import StepPattern
from longattn.core.reposition import Reposition


@dataclass
class SelectionContext:
    """What a method may know about the step besides the queries.

    Attributes:
        kv_len: keys in the cache after this step (``Tk``).
        q_offset: absolute position of query row 0 (``Tk - Tq`` for a causal decoder).
        layer: layer index.
        num_kv_heads: ``Hkv``.
        key_mask: ``[B, Tk]`` bool, False on padding keys; None when every key is valid.
        device: where the step's tensors live.
        keys: ``[B, Hkv, Tk, D]`` this layer's post-RoPE keys, cache included (a view, never a copy), for
            methods that score raw keys instead of block summaries; None where the caller has none.
        reposition: the session's position policy when it moves keys (None otherwise); methods with
            ``rotatable_scores`` score far blocks at its capped distance.
        backend: the attention backend this step runs on, resolved ("gather", "cpu", "triton", "flex");
            on "triton", methods with a ``fused_score`` select through the fused block top-k kernel.
        step_cache: what is built once per forward step and shared by its layers (the session clears it between
            steps): :class:`~longattn.core.pattern.StepPattern` by :meth:`StepPattern.key`, and what a method
            keys under its own name (``dense``'s Selection); None: no cache.
        pattern: the pattern of exactly these queries, set by :meth:`Method.select` for each chunk it hands to
            :meth:`Method.block_mask`.
        scale: the layer's softmax scale (from the model); None: ``D ** -0.5`` (see :meth:`softmax_scale`).
        block_means: ``(k_means, v_means [B, Hkv, Nblk, D] float32, counts [B, Nblk] int64)``, the mean key and
            value of every key block, kept incrementally by the session for methods whose ``uses_block_means``
            is True and batches without padding; None otherwise (the method computes them itself).
        memory: what the method keeps for this layer between the steps of one sequence (an eviction
            baseline's kept tokens); the session starts it empty with each new sequence. None: no memory.
        kv_split: the layer as a head-aware cache holds it (full and streaming KV heads apart), where the model
            runs on one; ``keys`` is then None (razor's compensation reads what the streaming heads dropped here).
    """

    kv_len: int
    q_offset: int
    layer: int
    num_kv_heads: int
    key_mask: Tensor | None = None
    device: torch.device = torch.device("cpu")
    keys: Tensor | None = None
    reposition: Reposition | None = None
    backend: str = "gather"
    step_cache: dict[tuple, Any] | None = None
    pattern: StepPattern | None = None
    scale: float | None = None
    block_means: tuple[Tensor, Tensor, Tensor] | None = None
    memory: dict[str, Any] | None = None
    kv_split: SplitKV | None = None

    def softmax_scale(self, head_dim: int) -> float:
        """The scale scores are multiplied by before the softmax: the model's, else ``head_dim ** -0.5``."""
        return float(self.scale) if self.scale is not None else head_dim ** -0.5
