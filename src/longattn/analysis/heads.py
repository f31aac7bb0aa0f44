"""Head instruments: which heads retrieve, which only stream, and where the attention sinks are.

Three measurements on real activations, all from sampled query rows (work ``[n, Tk]`` per head, never
``[Tq, Tk]``), gathered by :class:`HeadRecorder`, an observer for :func:`longattn.apply`:

- **retrieval score** (Retrieval Head, Wu et al. 2024, https://arxiv.org/abs/2404.15574): while the model
  copies a needle's answer from the prompt, a head scores a hit at a generated token when its highest
  attention falls on that very token inside the needle; hits / answer tokens, averaged over prompts.
- **streaming score** (DuoAttention, RazorAttention): share of a head's attention mass on the initial sink
  tokens plus the local window, averaged over query rows from the second half of each prompt (where most
  keys lie outside the window, so the share can be small).
- **sink map** (ACT, "Unveiling and Harnessing Hidden Attention Sinks", https://arxiv.org/abs/2406.15765):
  tokens that receive at least ``sink_factor`` times the uniform share, initial ones and hidden ones.

:func:`longattn.bench.profiling.profile_heads` drives the recorder over needle prompts and returns a
:class:`~longattn.core.profile.HeadProfile`, the JSON document that ``duo``, ``razor`` and ``act`` read; the
sampled-attention tensor functions live in :mod:`longattn.ops.sampled`, the figures in :mod:`longattn.bench.figures`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from longattn.core.selection import Selection
from longattn.ops.sampled import far_ratio_sums, last_row_argmax, local_mass, sample_positions, sampled_attention

# Scores of one chunk of sampled rows are [B, Hq, n, Tk]: bounded so a 128k prompt stays near 100 MB.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class HeadRecorder:
    """Observer for :func:`longattn.apply` that gathers every head's measurements over one generation.

    Feed it one prompt: the prefill call (``Tq > 1``) gives the streaming share and the sink ratios of
    ``sampled_queries`` rows from the prompt's second half, and every call (prefill included) the argmax
    key position of its last query, which produced the next generated token. Call :meth:`reset` between
    prompts. Batch size 1 only (one needle per prompt).
    """

    sink_tokens: int = 4
    window: int = 256
    sampled_queries: int = 32
    argmax: list[dict[int, Tensor]] = field(default_factory=list)
    """Per generated token, layer -> ``[Hq]`` argmax key position."""
    streaming: dict[int, Tensor] = field(default_factory=dict)
    """Layer -> ``[Hq]`` mean local mass of the prefill's sampled rows."""
    ratios: dict[int, Tensor] = field(default_factory=dict)
    """Layer -> ``[Hq, Tk]`` sink ratio of every prompt token, from the rows it is farther than ``window`` from
    (0 for a token no sampled row sees from afar)."""
    mass: dict[int, Tensor] = field(default_factory=dict)
    """Layer -> ``[Hq, Tk]`` mean attention of the sampled rows on every prompt token."""
    _calls: dict[int, int] = field(default_factory=dict)

    def __call__(self, layer: int, q: Tensor, k: Tensor, selection: Selection, scale: float,
                 key_mask: Tensor | None = None) -> None:
        if q.shape[0] != 1:
            raise ValueError(f"HeadRecorder measures one prompt at a time (batch 1), got batch {q.shape[0]}")
        step = self._calls.get(layer, 0)
        self._calls[layer] = step + 1
        while len(self.argmax) <= step:
            self.argmax.append({})
        self.argmax[step][layer] = last_row_argmax(q, k, key_mask)[0].cpu()
        tq, tk = q.shape[2], k.shape[2]
        if tq == 1:
            return
        half = tq // 2
        rows = half + sample_positions(tq - half, self.sampled_queries, q.device)
        positions = tk - tq + rows
        local, weighted, mass = [], torch.zeros(q.shape[1], tk), torch.zeros(q.shape[1], tk)
        far_rows = torch.zeros(tk, dtype=torch.long)
        step_rows = max(1, _CHUNK_ELEMENTS // (q.shape[1] * tk))
        for first in range(0, rows.numel(), step_rows):
            part, pos = rows[first : first + step_rows], positions[first : first + step_rows]
            probs = sampled_attention(q, k, scale, part, key_mask)[0]  # [Hq, n, Tk]
            local.append(local_mass(probs, pos, self.sink_tokens, self.window))
            sums, count = far_ratio_sums(probs, pos, self.window)
            weighted += sums.cpu()
            far_rows += count.cpu()
            mass += probs.sum(1).cpu()
        self.streaming[layer] = torch.cat(local, dim=1).mean(1).cpu()
        self.ratios[layer] = weighted / far_rows.clamp(min=1)  # sink_ratio over every chunk's rows
        self.mass[layer] = mass / rows.numel()

    def reset(self) -> None:
        self.argmax, self.streaming, self.ratios, self.mass, self._calls = [], {}, {}, {}, {}


def retrieval_hits(argmax: Sequence[dict[int, Tensor]], generated: Sequence[int], prompt_ids: Sequence[int],
                   span: tuple[int, int], num_layers: int, num_heads: int) -> Tensor:
    """Copy-paste hits of every head over one generation (Retrieval Head's rule).

    A generated token ``w`` counts when it occurs in the answer span ``[start, end)`` of the prompt; a head
    hits when its argmax key at that step is a position of the span holding ``w``.

    Args:
        argmax: per generated token, layer -> ``[Hq]`` argmax key position (:attr:`HeadRecorder.argmax`).
        generated: the generated token ids, in order; prompt_ids: the prompt's token ids.
        span: answer token span in the prompt.

    Returns:
        ``[L, Hq]`` float32 hit counts.
    """
    hits = torch.zeros(num_layers, num_heads)
    start, end = span
    answer = list(prompt_ids[start:end])
    for step, token in enumerate(generated[: len(argmax)]):
        if token not in answer:
            continue
        for layer, pos in argmax[step].items():
            inside = (pos >= start) & (pos < end)
            same = torch.tensor([inside[h] and prompt_ids[int(pos[h])] == token for h in range(pos.numel())])
            hits[layer] += same.float()
    return hits
