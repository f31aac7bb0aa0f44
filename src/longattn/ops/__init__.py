"""Attention operators: block-sparse attention and the exact (out, lse) merge."""

from longattn.ops.block_sparse import (
    BACKENDS,
    block_sparse_attention,
    block_sparse_attention_cpu,
    block_sparse_attention_reference,
    resolve_backend,
)
from longattn.ops.merge import merge_attention

__all__ = [
    "BACKENDS",
    "block_sparse_attention",
    "block_sparse_attention_cpu",
    "block_sparse_attention_reference",
    "merge_attention",
    "resolve_backend",
]
