"""StreamingLLM: attention sinks plus a sliding local window, no retrieval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from longattn.methods.base import Method


@dataclass
class Streaming(Method):
    """Keep the first ``sink_tokens`` (attention sinks) and the last ``window`` tokens before each query.

    The initial tokens absorb attention mass that softmax must put somewhere; keeping them lets a window
    model stay fluent far past its trained length, but it cannot recall anything outside the window.
    Paper: Efficient Streaming Language Models with Attention Sinks, https://arxiv.org/abs/2309.17453
    """

    name: ClassVar[str] = "streaming"
    paper: ClassVar[str] = "StreamingLLM: Efficient Streaming Language Models with Attention Sinks https://arxiv.org/abs/2309.17453"

    def streaming_kv_heads(self, layer: int, num_heads: int, num_kv_heads: int) -> tuple[bool, ...] | None:
        """Every KV head reads only its sinks and window, unless a position policy re-rotates the sinks (their
        distances then depend on positions a compact cache would not keep)."""
        if self.position_policy().changes_positions:
            return None
        return (True,) * num_kv_heads
