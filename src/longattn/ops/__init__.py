"""Attention operators: block-sparse attention, dense SDPA and the exact (out, lse) merge.

Each op folder holds its plain definition (``naive.py``) beside the fast paths that are tested against it.
"""

from longattn.ops.block_sparse import (
    BACKENDS,
    REPOSITION_BACKENDS,
    backend_function,
    block_sparse_attention,
    block_sparse_attention_cpu,
    block_sparse_attention_gather,
    block_sparse_attention_naive,
    block_sparse_attention_native,
    check_backend,
    native_available,
    resolve_backend,
)
from longattn.ops.dense import dense_attention, sliding_window_attention, sliding_window_attention_naive
from longattn.ops.merge import merge_attention
from longattn.ops.triton_utils import triton_available

__all__ = [
    "BACKENDS",
    "REPOSITION_BACKENDS",
    "backend_function",
    "block_sparse_attention",
    "block_sparse_attention_cpu",
    "block_sparse_attention_gather",
    "block_sparse_attention_naive",
    "block_sparse_attention_native",
    "check_backend",
    "dense_attention",
    "sliding_window_attention",
    "sliding_window_attention_naive",
    "merge_attention",
    "native_available",
    "resolve_backend",
    "triton_available",
]
