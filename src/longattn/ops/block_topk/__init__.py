"""Block scoring + top-k (what a scored method retrieves), with backend dispatch.

``naive`` is plain PyTorch (naive.py), the definition the kernels are tested against; ``triton`` fuses
scoring, pooling, masking and the top-k in one GPU kernel (triton_kernel.py); ``native`` does the same in a C
kernel for AVX-512 CPUs (native.py). ``auto`` picks triton on CUDA when Triton (with ``tl.topk``) is
installed, native on CPU where its kernel builds, else naive.
"""

from __future__ import annotations

import importlib

from torch import Tensor

from longattn.ops.block_topk.naive import KINDS, block_topk_naive
from longattn.ops.block_topk.native import block_topk_native, native_topk_available, native_topk_unavailable_reason
from longattn.ops.triton_utils import check_triton_runs, triton_available

TOPK_BACKENDS = ("auto", "naive", "native", "triton")
RENAMED_TOPK_BACKENDS = {"reference": "naive"}


def fused_topk_available() -> bool:
    """Whether the installed Triton has ``tl.topk`` (Triton >= 3.4), which the fused kernel needs."""
    if not triton_available():
        return False
    import triton.language as tl

    return hasattr(tl, "topk")


def block_topk(
    q: Tensor,
    summaries: Tensor,
    kind: str,
    top_k: int,
    query_block_size: int,
    limit: Tensor,
    sink_lo: Tensor,
    sink_hi: Tensor,
    has_key: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """``q [B, Hq, Tq, D]``, ``summaries [B, Hkv, Nblk, R, D]`` -> ``[B, Hq, Qblk, top_k]`` int32 block ids, best
    first, ``-1`` padded. See :func:`~longattn.ops.block_topk.naive.block_topk_naive` for the contract.

    Args:
        backend: one of ``TOPK_BACKENDS``; a forced "triton" or "native" that cannot run here raises.
    """
    if backend in RENAMED_TOPK_BACKENDS:
        raise ValueError(f"block top-k backend {backend!r} was renamed to {RENAMED_TOPK_BACKENDS[backend]!r}; "
                         f"backend must be one of {TOPK_BACKENDS}")
    if backend not in TOPK_BACKENDS:
        raise ValueError(f"backend must be one of {TOPK_BACKENDS}, got {backend!r}")
    device = q.device.type
    if backend == "auto":
        if device == "cuda" and fused_topk_available():
            backend = "triton"
        else:
            backend = "native" if device == "cpu" and native_topk_available() else "naive"
    if backend == "native":
        return block_topk_native(q, summaries, kind, top_k, query_block_size, limit, sink_lo, sink_hi, has_key)
    if backend == "triton":
        check_triton_runs(device, "the triton package with tl.topk (triton >= 3.4)")
        if not fused_topk_available():
            raise ValueError("backend='triton' needs tl.topk (triton >= 3.4): pip install -U 'longattn[gpu]'")
        fn = importlib.import_module("longattn.ops.block_topk.triton_kernel").block_topk_triton
        return fn(q, summaries, kind, top_k, query_block_size, limit, sink_lo, sink_hi, has_key)
    return block_topk_naive(q, summaries, kind, top_k, query_block_size, limit, sink_lo, sink_hi, has_key)


__all__ = ["KINDS", "TOPK_BACKENDS", "block_topk", "block_topk_naive", "block_topk_native", "fused_topk_available",
           "native_topk_available", "native_topk_unavailable_reason"]
