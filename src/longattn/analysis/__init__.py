"""Instruments: measure what a method keeps of dense attention, on real activations."""

from longattn.analysis.heads import HeadProfile, HeadRecorder, copy_hits, profile_heads
from longattn.analysis.recall import RecallRecorder, attention_recall, sample_positions

__all__ = [
    "HeadProfile", "HeadRecorder", "RecallRecorder", "attention_recall", "copy_hits", "profile_heads", "sample_positions",
]
