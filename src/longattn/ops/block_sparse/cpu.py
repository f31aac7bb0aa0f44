"""CPU fast path: the gather backend's chunked gathers (gather.py), each chunk computed by PyTorch's fused
CPU flash kernel.

The kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``, what SDPA itself runs on CPU) does the
masked softmax in cache-sized tiles and returns the log-sum-exp, saving the score tensor's round trips
through memory that gather's step-by-step softmax makes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.core.selection import Selection
from longattn.ops.block_sparse.gather import gathered_attention


def cpu_kernel_available() -> bool:
    """Whether this torch build has the fused CPU attention kernel with log-sum-exp output."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def attend_fused(
    q: Tensor, k: Tensor, v: Tensor, key_pos: Tensor, row_pos: Tensor, far: tuple[Tensor, Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`~longattn.ops.block_sparse.gather.attend_plain`, fused (one query and key per
    pair: ``far`` must be None)."""
    if far is not None:
        raise ValueError("the fused CPU kernel scores one query and key per pair; position policies "
                         "(reposition=) run on backend 'gather' or 'naive'")
    *lead, rows, d = q.shape
    keys = k.shape[-2]
    n = q[..., 0, 0].numel()
    hidden = key_pos > row_pos  # [..., rows, keys]
    bias = torch.zeros(hidden.shape, dtype=torch.float32, device=q.device).masked_fill_(hidden, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(n, 1, rows, d),
        k.float().reshape(n, 1, keys, d),
        v.float().reshape(n, 1, keys, d),
        attn_mask=bias.reshape(n, 1, rows, keys),
        scale=1.0,
    )
    # The kernel leaves rows without any visible key at out = 0, lse = 0; the contract says lse = -inf.
    empty = key_pos.amin(dim=-1, keepdim=True) > row_pos  # [..., rows, 1]
    lse = lse.view(*lead, rows).masked_fill(empty.squeeze(-1), float("-inf"))
    return out.view(*lead, rows, d), lse


def block_sparse_attention_cpu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    scale: float | None = None,
    *,
    causal: bool = True,
    key_mask: Tensor | None = None,
    q_offset: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Same signature and contract as :func:`~longattn.ops.block_sparse.naive.block_sparse_attention_naive`
    (without ``reposition``)."""
    if not cpu_kernel_available():
        raise ValueError("backend='cpu' needs torch's fused CPU attention kernel (torch >= 2.3); use 'gather'")
    return gathered_attention(q, k, v, selection, scale, causal, key_mask, q_offset, attend_fused)
