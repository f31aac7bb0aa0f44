"""Block top-k backend "native": a C kernel for x86-64 CPUs with AVX-512 (native_topk.c), built on first use.

Why a kernel: the naive path writes every query's score against every key block and reads it back to pool,
mask and sort, in float32 through memory; the kernel scores a query block against the key blocks before
its window only, max-pools the rows in registers and keeps a heap of the best ``top_k``: the same ids as
:func:`~longattn.ops.block_topk.naive.block_topk_naive` (ties to the lower block id), which the tests check.
Built like the attention kernel (``longattn.ops.native_build``); where it cannot be built,
``native_topk_available()`` is False and ``auto`` keeps naive.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from longattn.ops.block_topk.naive import check_topk_inputs
from longattn.ops.native_build import build_kernel

_SOURCE = Path(__file__).with_name("native_topk.c")
_ABI = 3


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded kernel library, or None and the reason it cannot be built here."""
    built = build_kernel("native top-k kernel", "block_topk", _SOURCE, (), "longattn_topk_abi_version", _ABI)
    lib = built.library
    if lib is None:
        return None, built.reason
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.longattn_block_topk.argtypes = [ptr] * 8 + [i64] * 11 + [ptr] + [ctypes.c_int] * 3
    lib.longattn_block_topk.restype = ctypes.c_int
    return lib, ""


def native_topk_available() -> bool:
    """Whether the native top-k kernel builds and loads on this machine (compiles it on the first call)."""
    return _library()[0] is not None


def native_topk_unavailable_reason() -> str:
    """Why :func:`native_topk_available` is False ("" when it is True)."""
    return _library()[1]


def block_topk_native(
    q: Tensor,
    summaries: Tensor,
    kind: str,
    top_k: int,
    query_block_size: int,
    limit: Tensor,
    sink_lo: Tensor,
    sink_hi: Tensor,
    has_key: Tensor | None = None,
) -> Tensor:
    """Same signature and contract as :func:`~longattn.ops.block_topk.naive.block_topk_naive`, on CPU tensors.

    ``q [B, Hq, Tq, D]`` (float32 and bfloat16 read as they are, other dtypes through a float32 copy),
    ``summaries [B, Hkv, Nblk, R, D]`` -> ``[B, Hq, Qblk, top_k]`` int32 block ids, best first, ``-1`` padded.
    """
    lib, reason = _library()
    if lib is None:
        raise ValueError(f"block top-k backend 'native' is unavailable: {reason}; use 'naive'")
    check_topk_inputs(q, summaries, kind, top_k, query_block_size, limit, sink_lo, sink_hi, has_key)
    if q.device.type != "cpu":
        raise ValueError(f"block top-k backend 'native' runs on CPU tensors only, got {q.device.type} tensors")
    b, hq, tq, d = q.shape
    hkv, nkb = summaries.shape[1], summaries.shape[2]
    nqb = -(-tq // query_block_size)
    qc = q if q.dtype in (torch.float32, torch.bfloat16) else q.float()
    if qc.stride(3) != 1:  # read at its strides otherwise: the model's transposed projection is not copied
        qc = qc.contiguous()
    q_strides = (ctypes.c_int64 * 3)(*qc.stride()[:3])
    s = summaries.float().contiguous()
    npad = -(-nkb // 32) * 32
    mt = None
    if nqb > 1:
        # Transposed once to [B, Hkv, Dk, Npad] (key blocks in the kernel's vector lanes) for the many query
        # blocks that read it; one query block (decode) transposes its columns in the kernel instead: this
        # copy took 0.3 ms at 32k tokens, longer than the decode scoring itself.
        rows = s[:, :, :, 0] if kind == "mean" else torch.cat([s[:, :, :, 1], s[:, :, :, 0]], dim=-1)
        mt = torch.nn.functional.pad(rows.transpose(-1, -2), (0, npad - nkb)).contiguous()
    lim = limit.to(torch.int64).contiguous()
    lo, hi = sink_lo.to(torch.int64).contiguous(), sink_hi.to(torch.int64).contiguous()
    keys = None if has_key is None else has_key.to(torch.uint8).contiguous()
    out = torch.empty(b, hq, nqb, top_k, dtype=torch.int32)
    code = lib.longattn_block_topk(
        qc.data_ptr(), None if mt is None else mt.data_ptr(), s.data_ptr(), lim.data_ptr(), lo.data_ptr(),
        hi.data_ptr(), None if keys is None else keys.data_ptr(), out.data_ptr(),
        b, hq, hkv, tq, d, nkb, npad, s.shape[3], query_block_size, nqb, top_k, q_strides,
        int(kind == "minmax"), int(qc.dtype == torch.bfloat16), torch.get_num_threads(),
    )
    if code != 0:
        raise ValueError(f"the native top-k kernel refused these inputs (code {code}); use 'naive'")
    return out
