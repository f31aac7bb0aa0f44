"""Backend "native": a C kernel for x86-64 CPUs with AVX-512 (native_kernel.c), compiled on first use.

Why a kernel: on CPU the gather backend spends its time copying the selected blocks and in the step-by-step
softmax's round trips through memory; the kernel reads each key and value straight from the cache as a
broadcast operand, keeps 16 query rows in the lanes of a vector and runs the online softmax in registers,
so it does only the selected blocks' arithmetic. bfloat16 inputs are computed as bf16 products with fp32
accumulation and an fp32 softmax, never through an upcast copy of the cache: on AMX tiles where the CPU has
them (``LONGATTN_NATIVE_AMX=0`` keeps the AVX512-BF16 path), else with AVX512-BF16 dot products.

The library (native_kernel.c with native_amx.h and native_rows.h) is built with the system C compiler
(``cc``, or ``$CC``) into a per-user cache keyed by the source, the flags and the CPU, once per machine
(0.3-2 s; ``compile_seconds()`` reports it). Where no compiler, no AVX-512 or no OpenMP exists,
``native_available()`` is False, ``native_unavailable_reason()`` says why and ``auto`` keeps the gather
backend.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from longattn.core.selection import Selection
from longattn.ops.block_sparse.checks import check_inputs
from longattn.ops.native_build import build_kernel, cpu_flags

_SOURCE = Path(__file__).with_name("native_kernel.c")
_HEADERS = (Path(__file__).with_name("native_rows.h"), Path(__file__).with_name("native_amx.h"))
_ABI = 4


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded kernel library, or None and the reason it cannot be built here."""
    built = build_kernel("native kernel", "block_sparse", _SOURCE, _HEADERS, "longattn_abi_version", _ABI)
    lib = built.library
    if lib is None:
        return None, built.reason
    lib.longattn_compile_seconds = built.compile_seconds
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.longattn_block_sparse.argtypes = ([ptr] * 8 + [i64] * 13 + [ptr, ptr] + [ctypes.c_int, ctypes.c_float]
                                          + [ctypes.c_int] * 3)
    lib.longattn_block_sparse.restype = ctypes.c_int
    return lib, ""


def native_available() -> bool:
    """Whether the native kernel builds and loads on this machine (compiles it on the first call)."""
    return _library()[0] is not None


def native_unavailable_reason() -> str:
    """Why :func:`native_available` is False ("" when it is True)."""
    return _library()[1]


def compile_seconds() -> float | None:
    """Seconds this process spent building the kernel (0.0: loaded from the cache; None: unavailable here)."""
    lib = _library()[0]
    return None if lib is None else lib.longattn_compile_seconds


def bf16_supported() -> bool:
    """Whether bfloat16 inputs run as bf16 products (AVX512-BF16); otherwise they are computed from fp32."""
    return "avx512_bf16" in cpu_flags()


def _rows_in_place(t: Tensor) -> bool:
    """``t [B, H, T, D]`` with contiguous rows, rows of a head adjacent and heads at one stride ``>= T*D``."""
    b, h, n, d = t.shape
    s0, s1, s2, s3 = t.stride()
    return s3 == 1 and s2 == d and s1 % d == 0 and s1 >= n * d and (b == 1 or s0 == h * s1)


def block_sparse_attention_native(
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
    (without ``reposition``), on CPU tensors.

    ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``, selection ``[B, H, Qblk, S]`` with H in {Hq, Hkv} ->
    ``out [B, Hq, Tq, D]`` in q's dtype, ``lse [B, Hq, Tq]`` float32 (``0`` and ``-inf`` on rows without a key).
    float32 and bfloat16 run natively; float16 (no CPU instructions for it here) through a float32 copy.
    """
    lib, reason = _library()
    if lib is None:
        raise ValueError(f"backend='native' is unavailable: {reason}; use 'gather'")
    offset = check_inputs(q, k, v, selection, key_mask, q_offset)
    if q.device.type != "cpu":
        raise ValueError(f"backend='native' runs on CPU tensors only, got {q.device.type} tensors")
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bf16 = q.dtype == torch.bfloat16 and bf16_supported() and d % 2 == 0
    work = torch.bfloat16 if bf16 else torch.float32
    if d > 256:
        raise ValueError(f"backend='native' takes head dimensions up to 256, got D={d}; use 'gather'")
    # No copies for inputs of the working dtype laid out as the kernel reads them (the usual case): q at its
    # strides with d contiguous (the model's transposed projection); k and v rows contiguous within a head,
    # heads at one stride, which a cache with room to grow (a view of the first Tk rows of a longer buffer,
    # longattn.hf.cache) is: read in place, never copied per step.
    qc = q.to(work)
    if qc.stride(3) != 1:
        qc = qc.contiguous()
    kc, vc = k.to(work), v.to(work)
    if not (_rows_in_place(kc) and _rows_in_place(vc) and kc.stride() == vc.stride()):
        kc, vc = kc.contiguous(), vc.contiguous()
    tcap = kc.stride(1) // d
    idx = selection.indices.contiguous()
    cnt = selection.counts.contiguous()
    mask = None if key_mask is None else key_mask.to(torch.uint8).contiguous()
    # Written [B, Tq, Hq, D] and returned as its [B, Hq, Tq, D] view: the layout the model reshapes the
    # attention output from, so its transpose back is free instead of a copy per layer.
    out = torch.empty(b, tq, hq, d, dtype=torch.float32).transpose(1, 2)
    q_strides, out_strides = ((ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (qc, out))
    lse = torch.empty(b, hq, tq, dtype=torch.float32)
    code = lib.longattn_block_sparse(
        qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), idx.data_ptr(), cnt.data_ptr(),
        None if mask is None else mask.data_ptr(), out.data_ptr(), lse.data_ptr(),
        b, hq, hkv, selection.num_heads, tq, tk, tcap, d, idx.shape[-1], selection.num_q_blocks,
        selection.kv_block_size, selection.query_block_size, offset, q_strides, out_strides,
        int(causal), scale, int(bf16),
        int(os.environ.get("LONGATTN_NATIVE_AMX", "1") != "0"), torch.get_num_threads(),
    )
    if code != 0:
        raise ValueError(f"the native kernel refused these inputs (code {code}); use 'gather'")
    return out.to(q.dtype), lse
