"""Where the Triton tests run: CUDA at full size when there is a GPU, else Triton's CPU interpreter on small shapes."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TRITON_MISSING = "triton is not installed (pip install 'longattn[gpu]'; the test extra installs it on Linux x86_64)"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="full-size kernel checks need a CUDA GPU")


def shape_id(b: int, hq: int, hkv: int, tq: int, tk: int, d: int, bs: int) -> str:
    """Test ids like ``B1-H8-HKV2-T1000-D64-bs64`` (``Tq..-T..`` when queries are fewer than keys)."""
    t = f"T{tk}" if tq == tk else f"Tq{tq}-T{tk}"
    return f"B{b}-H{hq}-HKV{hkv}-{t}-D{d}-bs{bs}"
