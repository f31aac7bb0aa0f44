"""Instruments: measure what a method keeps of dense attention, on real activations.

Recorders are observers for :func:`longattn.apply`; they import only from core and ops. The driver that runs
prompts through a model to fill a HeadProfile is :func:`longattn.bench.profiling.profile_heads`.
"""

from longattn.analysis.heads import HeadRecorder, retrieval_hits
from longattn.analysis.recall import RecallRecorder, attention_recall, output_error, recall_and_oracle
from longattn.ops.sampled import sample_positions

__all__ = [
    "HeadRecorder", "RecallRecorder", "attention_recall", "output_error", "recall_and_oracle", "retrieval_hits",
    "sample_positions",
]
