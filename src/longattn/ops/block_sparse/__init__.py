"""Block-sparse attention operator with backend dispatch.

Backends (same signature and contract, each tested against ``naive``):

- ``native``: a C kernel for x86-64 CPUs with AVX-512, compiled on first use (native.py, native_kernel.c):
  reads the selected blocks straight from the cache, bf16 as bf16 products; the fastest on such CPUs.
- ``gather``: optimised PyTorch, chunked gathers of the selected blocks (gather.py); the CPU fallback where
  native cannot be built, and the only fast path that applies position policies (``reposition=``).
- ``cpu``: the gather with PyTorch's fused CPU attention kernel per chunk (cpu.py), a cross-check.
- ``triton``: one fused Triton kernel, prefill and split-K decode (triton_kernel.py); CUDA, or Triton's
  interpreter on CPU when ``TRITON_INTERPRET=1`` is set before import.
- ``flex``: the Selection as a FlexAttention ``BlockMask`` (flex.py); CUDA.
- ``naive``: the plain definition (naive.py): float32, a masked dense softmax per query block. Slow; for
  tests and end-to-end checks of the others. Applies position policies too.
- ``auto``: ``triton`` on CUDA when Triton is installed, ``native`` on a CPU where it builds, else ``gather``;
  ``gather`` under a position policy.

Heads a Selection marks dense (``Selection.dense_heads``) run through dense SDPA on every backend but naive.
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import Tensor

from longattn.core.reposition import Reposition
from longattn.core.selection import Selection
from longattn.ops.block_sparse.checks import check_inputs
from longattn.ops.block_sparse.cpu import block_sparse_attention_cpu, cpu_kernel_available
from longattn.ops.block_sparse.dense_heads import attention_with_dense_heads
from longattn.ops.block_sparse.gather import block_sparse_attention_gather
from longattn.ops.block_sparse.naive import block_sparse_attention_naive
from longattn.ops.block_sparse.native import (
    block_sparse_attention_native,
    native_available,
    native_unavailable_reason,
)
from longattn.ops.block_sparse.regions import regioned_attention
from longattn.ops.block_sparse.split import split_kv_attention, split_kv_attention_reference
from longattn.ops.triton_utils import check_triton_runs, triton_available, triton_interpreted

BACKENDS = ("auto", "gather", "cpu", "native", "triton", "flex", "naive")
REPOSITION_BACKENDS = ("auto", "gather", "naive")
"""The backends that apply a position policy that moves single blocks (``longheads``): the PyTorch paths. Every
other policy runs as exact region passes on any backend (:mod:`longattn.ops.block_sparse.regions`)."""
RENAMED_BACKENDS = {"reference": "gather"}
"""Old backend names -> their current ones (passing an old one raises and names the new one)."""


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` unless ``backend`` is one of ``BACKENDS`` (a renamed one says its new name)."""
    if backend in RENAMED_BACKENDS:
        raise ValueError(
            f"backend {backend!r} was renamed to {RENAMED_BACKENDS[backend]!r}; backend must be one of {BACKENDS}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device_type: str, reposition: bool = False) -> str:
    """The backend "auto" stands for on ``device_type``; a forced backend that cannot run raises.

    Args:
        reposition: whether a position policy moves single blocks (only ``REPOSITION_BACKENDS`` implement that;
            policies made of regions run on every backend).
    """
    check_backend(backend)
    if backend == "auto":
        if reposition:
            return "gather"
        if device_type == "cuda" and triton_available():
            return "triton"
        # Measured on 2 Xeon cores (benchmarks/cpu_speed.py, docs/results/cpu.md): at 16k tokens, 16-token
        # blocks and 10% density native is ~6x causal SDPA in float32 where gather is ~1x (it copies every
        # selected block), and ~6x SDPA in decode over a 32k cache where gather is ~0.6x.
        if device_type == "cpu" and native_available():
            return "native"
        return "gather"
    if reposition and backend not in REPOSITION_BACKENDS:
        raise ValueError(
            f"reposition= (a position policy that moves keys) runs on backend 'auto', 'gather' or 'naive' (only "
            f"the PyTorch paths re-rotate keys), not {backend!r}"
        )
    if backend == "triton":
        check_triton_runs(device_type)
    if backend == "flex":
        from longattn.ops.block_sparse.flex import flex_available

        if not flex_available():
            raise ValueError("backend='flex' needs torch.nn.attention.flex_attention with BlockMask.from_kv_blocks "
                             "(torch >= 2.5)")
        if device_type != "cuda":
            raise ValueError(
                f"backend='flex' runs compiled on CUDA tensors only, got {device_type} tensors (FlexAttention on "
                "CPU would materialise every score); use 'gather' or 'cpu'"
            )
    if backend == "native":
        if device_type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors only, got {device_type} tensors")
        if not native_available():
            raise ValueError(f"backend='native' is unavailable here: {native_unavailable_reason()}; use 'gather'")
    if backend == "cpu" and not cpu_kernel_available():
        raise ValueError("backend='cpu' needs torch's fused CPU attention kernel (torch >= 2.3); use 'gather'")
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
    reposition: Reposition | None = None,
    moved_keys: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of each query block over its selected key blocks.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]``; selection: ``[B, H, Qblk, S]`` with H in {Hq, Hkv}.
        backend: one of ``BACKENDS``: "native" (the C kernel for AVX-512 CPUs), "gather" (optimised PyTorch),
            "cpu" (the same gather with PyTorch's fused CPU attention kernel per chunk, a cross-check), "triton"
            (fused GPU kernel, split-K in decode), "flex" (FlexAttention with the Selection as its BlockMask),
            "naive" (the plain definition, slow) or "auto" (triton on CUDA when installed, native on a CPU where
            it builds, else gather). A forced backend that cannot run here raises.
        reposition: a position policy bound to the model's RoPE (context extension), see
            :func:`~longattn.ops.block_sparse.naive.block_sparse_attention_naive`. A policy made of regions
            (self_extend, infllm, dca) runs as one pass of the backend per region, merged exactly
            (:func:`~longattn.ops.block_sparse.regions.regioned_attention`); "gather" and "naive" named
            explicitly keep their own policy code (the references). ``longheads`` runs on "gather" (also for
            "auto") or "naive".
        moved_keys: for a policy made of regions, ``reposition.shifted_keys(k)`` kept by the caller between
            steps (the session does); ignored otherwise.

    Heads with ``selection.dense_heads`` True run through dense SDPA (whole GQA groups when H == Hkv, each
    query head with its KV head when H == Hq), the others through the backend; their ``lse`` is NaN, since
    SDPA returns none (a caller that reads ``lse`` on every head passes ``selection.without_dense_heads()``).
    The flag is ignored, every head computed from its blocks, with a ``reposition``, with ``causal=False``
    and on backend "naive".

    Returns:
        ``out [B, Hq, Tq, D]`` and ``lse [B, Hq, Tq]`` float32. See
        :func:`~longattn.ops.block_sparse.naive.block_sparse_attention_naive` for the full contract.
    """
    policy = None if reposition is None else reposition.policy
    regions = policy is not None and policy.by_regions and not (policy.by_gather and backend in ("gather", "naive"))
    chosen = resolve_backend(backend, q.device.type, reposition is not None and not regions)
    if regions:
        if not causal:
            raise ValueError("reposition= (a position policy) re-encodes distances to earlier keys; it needs "
                             "causal=True")
        offset = check_inputs(q, k, v, selection, key_mask, q_offset, validate_selection=False)
        return regioned_attention(q, k, v, selection, scale, key_mask, offset, reposition, backend_function(chosen),
                                  moved_keys)
    if reposition is not None:
        op = block_sparse_attention_naive if chosen == "naive" else block_sparse_attention_gather
        return op(q, k, v, selection, scale, causal=causal, key_mask=key_mask, q_offset=q_offset,
                  reposition=reposition)
    if selection.dense_heads is not None and causal and chosen != "naive":
        # The dense heads' indices are never read, and the backend validates what it is given (the other
        # heads): checking the Selection here would cost a device sync per call for nothing.
        offset = check_inputs(q, k, v, selection, key_mask, q_offset, validate_selection=False)
        return attention_with_dense_heads(q, k, v, selection, scale, key_mask, offset, backend_function(chosen))
    return backend_function(chosen)(q, k, v, selection, scale, causal=causal, key_mask=key_mask, q_offset=q_offset)


def backend_function(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """The operator of a resolved backend name (GPU modules are imported on first use)."""
    if name == "triton":
        return importlib.import_module("longattn.ops.block_sparse.triton_kernel").block_sparse_attention_triton
    if name == "flex":
        return importlib.import_module("longattn.ops.block_sparse.flex").block_sparse_attention_flex
    if name == "cpu":
        return block_sparse_attention_cpu
    if name == "gather":
        return block_sparse_attention_gather
    if name == "native":
        return block_sparse_attention_native
    if name == "naive":
        return block_sparse_attention_naive
    if name in RENAMED_BACKENDS:
        check_backend(name)
    raise ValueError(f"no operator for backend {name!r}; resolve 'auto' first (resolve_backend)")


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
    "check_triton_runs",
    "native_available",
    "native_unavailable_reason",
    "resolve_backend",
    "split_kv_attention",
    "split_kv_attention_reference",
    "triton_available",
    "triton_interpreted",
]
