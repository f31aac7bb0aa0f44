"""Instruments: measure what a method keeps of dense attention, on real activations."""

from longattn.analysis.recall import RecallRecorder, attention_recall, sample_positions

__all__ = ["RecallRecorder", "attention_recall", "sample_positions"]
