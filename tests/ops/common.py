"""Shared helpers of the operator tests: inputs, selections, the relative RMS error, an SDPA cross-check."""

from __future__ import annotations

import math

import torch

from longattn.core.selection import Selection


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of ``a`` against ``b`` (fla's comparison of a fused op with its naive reference)."""
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-12))


def case_id(b: int, hq: int, hkv: int, tq: int, tk: int, d: int, bs: int, qbs: int | None = None,
            q_offset: int | None = None) -> str:
    """Test ids like ``B2-T100-H8-D32-HKV2-bs16-qbs32`` (``Tq..`` when queries are fewer than keys, ``off..``
    for an explicit q_offset)."""
    parts = [f"B{b}", f"T{tk}", f"H{hq}", f"D{d}"]
    if hkv != hq:
        parts.append(f"HKV{hkv}")
    if tq != tk:
        parts.append(f"Tq{tq}")
    if q_offset is not None:
        parts.append(f"off{q_offset}")
    parts.append(f"bs{bs}")
    if qbs is not None:
        parts.append(f"qbs{qbs}")
    return "-".join(parts)


def make_qkv(b, hq, hkv, tq, tk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    return q, k, v


def full_selection(b, h, tq, tk, qbs, bs):
    """Every key block for every query block (the causal mask inside is the operator's)."""
    nqb, nkb = -(-tq // qbs), -(-tk // bs)
    return Selection.from_mask(torch.ones(b, h, nqb, nkb, dtype=torch.bool), qbs, bs)


def random_selection(b, h, tq, tk, qbs, bs, density, seed, device=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, -(-tq // qbs), -(-tk // bs), generator=g) < density
    return Selection.from_mask(mask.to(device) if device is not None else mask, qbs, bs)


def masked_dense(q, k, v, selection, key_mask=None, q_offset=None):
    """An independent check of naive: dense attention with the token mask a Selection implies (small shapes)."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    bs, qbs = selection.kv_block_size, selection.query_block_size
    offset = tk - tq if q_offset is None else q_offset
    nkb = -(-tk // bs)
    blocks = selection.to_mask(nkb).cpu()  # [B, H, Qblk, Nblk]
    blocks = blocks.repeat_interleave(hq // blocks.shape[1], dim=1)
    tokens = blocks.repeat_interleave(qbs, dim=2)[:, :, :tq].repeat_interleave(bs, dim=3)[..., :tk]
    qpos = (offset + torch.arange(tq)).view(-1, 1)
    allowed = tokens & (torch.arange(tk).view(1, -1) <= qpos)
    if key_mask is not None:
        allowed = allowed & key_mask.cpu().view(b, 1, 1, tk)
    kr = k.cpu().float().repeat_interleave(hq // hkv, dim=1)
    vr = v.cpu().float().repeat_interleave(hq // hkv, dim=1)
    scores = (q.cpu().float() @ kr.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.where(allowed, torch.exp(scores - lse.unsqueeze(-1).clamp(min=-1e30)), torch.zeros_like(scores))
    out = p @ vr
    return out, lse


def assert_matches_naive(out, lse, ref, ref_lse, tol: float, lse_atol: float = 2e-3) -> None:
    """``(out, lse)`` of a backend against naive's: the same empty rows (0, -inf), rel RMS ``tol`` elsewhere."""
    assert out.shape == ref.shape and out.dtype == ref.dtype and lse.dtype == torch.float32
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows without keys must get lse = -inf, and only those"
    assert bool((out[empty] == 0).all())
    if bool((~empty).any()):
        assert rel_rms(out[~empty], ref[~empty]) < tol
        torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=lse_atol, rtol=1e-3)
