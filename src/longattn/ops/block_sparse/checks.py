"""Input checks every block-sparse backend runs first: shapes, dtypes, devices, the Selection."""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.core.selection import Selection


def check_inputs(
    q: Tensor, k: Tensor, v: Tensor, selection: Selection, key_mask: Tensor | None, q_offset: int | None,
    validate_selection: bool = True,
) -> int:
    """Validate operator inputs (the Selection's values too, unless ``validate_selection`` is False: that check
    reads back from the device); returns the absolute position of the first query."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, T, D], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, tq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must be [B={b}, Hkv, Tk, D={d}], got {tuple(k.shape)}")
    hkv, tk = k.shape[1], k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    offset = tk - tq if q_offset is None else q_offset
    if offset < 0 or offset + tq > tk:
        raise ValueError(f"q_offset={offset} with q_len={tq} must fit inside kv_len={tk}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (b, tk)):
        raise ValueError(f"key_mask must be a bool tensor [B={b}, Tk={tk}], got {key_mask.dtype} {tuple(key_mask.shape)}")
    for name, t in (("k", k), ("v", v), ("key_mask", key_mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if validate_selection:
        selection.validate(tq, tk, hq, hkv, b, q.device)
    elif selection.indices.shape[:2] not in ((b, hq), (b, hkv)) or selection.indices.device != q.device:
        raise ValueError(f"selection [B, H] = {tuple(selection.indices.shape[:2])} on {selection.indices.device} does "
                         f"not fit queries [B={b}, Hq={hq}] / keys [Hkv={hkv}] on {q.device}")
    return offset
