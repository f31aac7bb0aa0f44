"""Block-sparse attention operator with backend dispatch."""

from __future__ import annotations

from torch import Tensor

from longattn.core.positions import Reposition
from longattn.core.selection import Selection
from longattn.ops.block_sparse.cpu import block_sparse_attention_cpu, cpu_kernel_available
from longattn.ops.block_sparse.reference import block_sparse_attention_reference

BACKENDS = ("auto", "reference", "cpu")


def resolve_backend(backend: str, device_type: str) -> str:
    """The backend "auto" stands for on ``device_type``; a forced backend that cannot run raises."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        # Measured on 2 CPU cores (benchmarks/attention_op.py): once blocks are gathered as whole runs, the
        # plain path is as fast as the fused kernel (5.2x vs 4.6x over SDPA at 8k tokens, 10% density).
        return "reference"
    if backend == "cpu" and not cpu_kernel_available():
        raise ValueError("backend='cpu' needs torch's fused CPU attention kernel (torch >= 2.3); use 'reference'")
    if backend == "cpu" and device_type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors only, got {device_type} tensors")
    return backend


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    scale: float | None = None,
    *,
    causal: bool = True,
    key_mask: Tensor | None = None,
    q_offset: int | None = None,
    backend: str = "auto",
    positions: Reposition | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of each query block over its selected key blocks.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]``; selection: ``[B, H, Qblk, S]`` with H in {Hq, Hkv}.
        backend: one of ``BACKENDS``: "reference" (plain PyTorch), "cpu" (the same gather with PyTorch's
            fused CPU attention kernel per chunk, a cross-check), or "auto" (today: reference, the fastest
            measured on CPU; GPU kernels are a later backend).
        positions: a bound position policy (context extension), see the reference; runs on "reference".

    Returns:
        ``out [B, Hq, Tq, D]`` and ``lse [B, Hq, Tq]`` float32. See
        :func:`~longattn.ops.block_sparse.reference.block_sparse_attention_reference` for the full contract.
    """
    chosen = resolve_backend(backend, q.device.type)
    if positions is not None:
        if chosen != "reference":
            raise ValueError(f"positions= runs on backend 'reference' or 'auto', not {backend!r}")
        return block_sparse_attention_reference(
            q, k, v, selection, scale, causal=causal, key_mask=key_mask, q_offset=q_offset, positions=positions
        )
    fn = block_sparse_attention_cpu if chosen == "cpu" else block_sparse_attention_reference
    return fn(q, k, v, selection, scale, causal=causal, key_mask=key_mask, q_offset=q_offset)


__all__ = [
    "BACKENDS",
    "block_sparse_attention",
    "block_sparse_attention_cpu",
    "block_sparse_attention_reference",
    "resolve_backend",
]
