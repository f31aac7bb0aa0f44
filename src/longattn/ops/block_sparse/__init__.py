"""Block-sparse attention operator with backend dispatch.

Backends (same signature and contract, each tested against the reference):

- ``reference``: plain PyTorch, chunked gathers (reference.py); the only one that applies position policies.
- ``cpu``: the reference's gathers with PyTorch's fused CPU attention kernel per chunk (cpu.py).
- ``triton``: one fused Triton kernel, prefill and split-K decode (triton_kernel.py); CUDA, or Triton's
  interpreter on CPU when ``TRITON_INTERPRET=1`` is set before import.
- ``flex``: the Selection as a FlexAttention ``BlockMask`` (flex.py); CUDA.
- ``auto``: ``triton`` on CUDA when Triton is installed, else ``reference``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

from torch import Tensor

from longattn.core.positions import Reposition
from longattn.core.selection import Selection
from longattn.ops.block_sparse.cpu import block_sparse_attention_cpu, cpu_kernel_available
from longattn.ops.block_sparse.reference import block_sparse_attention_reference

BACKENDS = ("auto", "reference", "cpu", "triton", "flex")


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (``pip install 'longattn[gpu]'``)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether our Triton kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return bool(importlib.import_module("longattn.ops.block_sparse.triton_kernel").INTERPRETED)


def check_triton_runs(device_type: str, needs: str = "the triton package") -> None:
    """Raise unless Triton kernels can run on ``device_type`` tensors: CUDA, or CPU in Triton's interpreter."""
    if not triton_available():
        raise ValueError(f"backend='triton' needs {needs}: pip install 'longattn[gpu]'")
    if device_type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"backend='triton' runs on CUDA tensors, got {device_type} tensors (on CPU, set TRITON_INTERPRET=1 "
            "before importing longattn to run the kernels in Triton's interpreter, slowly)"
        )


def resolve_backend(backend: str, device_type: str, positions: bool = False) -> str:
    """The backend "auto" stands for on ``device_type``; a forced backend that cannot run raises.

    Args:
        positions: whether a position policy re-rotates keys (only "reference" implements that).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if positions:
            return "reference"
        if device_type == "cuda" and triton_available():
            return "triton"
        # Measured on 2 CPU cores (benchmarks/attention_op.py): once blocks are gathered as whole runs, the
        # plain path is as fast as the fused kernel (5.2x vs 4.6x over SDPA at 8k tokens, 10% density).
        return "reference"
    if positions and backend != "reference":
        raise ValueError(f"positions= runs on backend 'reference' or 'auto' (only the reference re-rotates keys), not {backend!r}")
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
                "CPU would materialise every score); use 'reference' or 'cpu'"
            )
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
            fused CPU attention kernel per chunk, a cross-check), "triton" (fused GPU kernel, split-K in
            decode), "flex" (FlexAttention with the Selection as its BlockMask) or "auto" (triton on CUDA
            when installed, else reference). A forced backend that cannot run here raises.
        positions: a bound position policy (context extension), see the reference; runs on "reference".

    Returns:
        ``out [B, Hq, Tq, D]`` and ``lse [B, Hq, Tq]`` float32. See
        :func:`~longattn.ops.block_sparse.reference.block_sparse_attention_reference` for the full contract.
    """
    chosen = resolve_backend(backend, q.device.type, positions is not None)
    if positions is not None:
        return block_sparse_attention_reference(
            q, k, v, selection, scale, causal=causal, key_mask=key_mask, q_offset=q_offset, positions=positions
        )
    return backend_function(chosen)(q, k, v, selection, scale, causal=causal, key_mask=key_mask, q_offset=q_offset)


def backend_function(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """The operator of a resolved backend name (GPU modules are imported on first use)."""
    if name == "triton":
        return importlib.import_module("longattn.ops.block_sparse.triton_kernel").block_sparse_attention_triton
    if name == "flex":
        return importlib.import_module("longattn.ops.block_sparse.flex").block_sparse_attention_flex
    if name == "cpu":
        return block_sparse_attention_cpu
    if name == "reference":
        return block_sparse_attention_reference
    raise ValueError(f"no operator for backend {name!r}; resolve 'auto' first (resolve_backend)")


__all__ = [
    "BACKENDS",
    "backend_function",
    "block_sparse_attention",
    "block_sparse_attention_cpu",
    "block_sparse_attention_reference",
    "resolve_backend",
    "triton_available",
]
