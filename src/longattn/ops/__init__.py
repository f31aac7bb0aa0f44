"""Attention operators: block-sparse attention and the exact (out, lse) merge."""

from longattn.ops.block_sparse import (
    BACKENDS,
    backend_function,
    block_sparse_attention,
    block_sparse_attention_cpu,
    block_sparse_attention_reference,
    resolve_backend,
    triton_available,
)
from longattn.ops.merge import merge_attention

__all__ = [
    "BACKENDS",
    "backend_function",
    "block_sparse_attention",
    "block_sparse_attention_cpu",
    "block_sparse_attention_reference",
    "merge_attention",
    "resolve_backend",
    "triton_available",
]
