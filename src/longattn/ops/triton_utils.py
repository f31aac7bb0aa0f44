"""What the Triton kernels and their dispatchers share: availability, interpreter mode, launch sizing.

Importable without Triton (the dispatchers import it on every machine): ``triton`` itself is imported only
inside the functions that need it, and the kernel modules (``ops/<op>/triton_kernel.py``) only on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch
from torch import Tensor


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (``pip install 'longattn[gpu]'``)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    """Whether Triton builds kernels for its CPU interpreter right now (``TRITON_INTERPRET=1``).

    ``@triton.jit`` reads this when a kernel is defined, so each kernel module reads it once, at import, into
    its ``INTERPRETED`` flag; ask :func:`triton_interpreted` for what the kernels were actually built for.
    """
    import triton

    if hasattr(triton, "knobs"):
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_interpreted() -> bool:
    """Whether our Triton kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at their
    import). Imports the attention kernel module, and so builds its kernels, on first use."""
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


def dot_tile(n: int) -> int:
    """The tile width covering ``n``: the next power of two, at least 16 (the smallest ``tl.dot`` operand)."""
    return max(16, 1 << max(0, n - 1).bit_length())


def kernel_flags(mask: Tensor | None, like: Tensor) -> Tensor:
    """A bool mask as the contiguous uint8 tensor the kernels read; None gives a 1-element placeholder (the
    kernel's ``HAS_*`` constexpr then never reads it)."""
    if mask is None:
        return like.new_ones(1, dtype=torch.uint8)
    return mask.to(torch.uint8).contiguous()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 in the interpreter (a few splits, so tests exercise the
    split-K merge)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def fill_splits(programs: int, max_tiles: int, device: torch.device) -> int:
    """Programs to split each of ``programs`` scans of up to ``max_tiles`` tiles into (split-K): enough to fill
    the GPU twice over, at least one tile each, at most 64. Shared by the attention and block top-k kernels."""
    want = -(-2 * sm_count(device) // max(programs, 1))
    return max(1, min(want, max_tiles, 64))
