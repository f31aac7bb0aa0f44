"""RoPE as position policies see it: re-rotation of post-RoPE vectors and the model's rotary settings.

Rotating a post-RoPE vector by ``delta * inv_freq`` gives the vector RoPE would have produced at ``position +
delta`` (Hugging Face's rotate-half layout), so policies move cached keys and queries without touching the
model or its cache. :func:`rotate` is the plain reference; :class:`~longattn.core.reposition.Reposition`
serves the same contract from a table of integer shifts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from longattn.core.checks import check_int

# RoPE variants whose encoding is a pure rotation by position x inv_freq (any static frequency rescaling is
# already in the model's inv_freq). "dynamic" changes inv_freq with the sequence length and "longrope" keeps
# two sets of frequencies, so a re-rotation with one inv_freq would be wrong for them.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rotate(x: Tensor, delta: Tensor, inv_freq: Tensor) -> Tensor:
    """Move RoPE-encoded vectors by ``delta`` positions (Hugging Face's rotate-half layout).

    Args:
        x: ``[..., n, D]`` post-RoPE queries or keys.
        delta: ``[..., n]`` integer position shifts (broadcastable to ``x.shape[:-1]``); 0 leaves a row as is.
        inv_freq: ``[D / 2]`` the model's RoPE inverse frequencies.

    Returns:
        ``[..., n, D]`` in ``x``'s dtype: ``x`` as RoPE would have encoded it at ``position + delta``.
    """
    d = x.shape[-1]
    if inv_freq.dim() != 1 or 2 * inv_freq.shape[0] != d:
        raise ValueError(f"inv_freq must be [D/2 = {d // 2}] for head dim {d}, got {tuple(inv_freq.shape)}")
    angle = _angle(delta, inv_freq)
    cos, sin = angle.cos(), angle.sin()
    xf = x.float()
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _angle(delta: Tensor, inv_freq: Tensor) -> Tensor:
    """``delta [...]`` x ``inv_freq [D/2]`` -> ``[..., D/2]`` float32 angles, computed in float64 and reduced mod
    2*pi first: at 32k positions a float32 product is off by ~1e-3 rad."""
    return torch.remainder(delta.to(torch.float64).unsqueeze(-1) * inv_freq.to(torch.float64), 2 * math.pi).float()


@dataclass(frozen=True)
class Rope:
    """What a policy needs to know about the model's position encoding.

    Attributes:
        inv_freq: ``[D / 2]`` float32 inverse frequencies, read from the model (rescaled ones included).
        trained_window: the longest distance the model was trained on (``max_position_embeddings``).
    """

    inv_freq: Tensor
    trained_window: int

    @classmethod
    def from_model(cls, model: Any) -> "Rope":
        """Read the rotary embedding of a Llama-family model; unsupported RoPE variants raise ``ValueError``."""
        config = getattr(model, "config", None)
        rotary = [m for m in model.modules() if hasattr(m, "rope_type")
                  and (hasattr(m, "inv_freq") or hasattr(m, "full_attention_inv_freq"))]
        if not rotary:
            raise ValueError(
                f"{type(model).__name__} has no rotary embedding module (with inv_freq and rope_type); position "
                "policies need a RoPE model (Llama, Mistral, Qwen2, Qwen3, SmolLM, Gemma 3)"
            )
        module = rotary[0]
        rope_type, inv_freq = module.rope_type, getattr(module, "inv_freq", None)
        if isinstance(rope_type, dict):
            # RoPE per layer type (Gemma 3: local and global theta). Policies act where the method selects,
            # on the full-attention layers; sliding layers run at real positions inside their window.
            rope_type, inv_freq = rope_type.get("full_attention"), getattr(module, "full_attention_inv_freq", None)
            if inv_freq is None:
                raise ValueError(f"{type(model).__name__}'s RoPE has no full_attention entry; position policies "
                                 "read the full-attention layers' RoPE")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"RoPE type {rope_type!r} is not supported by position policies; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        params = getattr(config, "rope_parameters", None) or {}
        partial = getattr(config, "partial_rotary_factor", None) or (
            params.get("partial_rotary_factor") if isinstance(params, dict) else None) or 1.0
        if partial != 1.0:
            raise ValueError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported by "
                             "position policies")
        window = getattr(config, "max_position_embeddings", None)
        check_int("max_position_embeddings", window, 1)
        return cls(inv_freq.detach().float().clone(), int(window))
