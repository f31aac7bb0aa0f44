"""The peak-memory probe sees an allocation made and freed inside its block."""

from __future__ import annotations

import time

import torch

from longattn.bench.memory import PeakMemory, rss_bytes


def test_peak_rss_sees_a_temporary_allocation():
    size = 256 * 2**20
    with PeakMemory("cpu") as mem:
        block = torch.ones(size // 4)  # written, so its pages are resident
        time.sleep(0.05)
        del block
    assert mem.kind == "rss" and mem.start_bytes > 0
    assert mem.peak_bytes - mem.start_bytes >= 0.8 * size
    assert rss_bytes() < mem.peak_bytes


def test_nothing_allocated_means_little_growth():
    with PeakMemory("cpu") as mem:
        time.sleep(0.02)
    assert mem.peak_bytes - mem.start_bytes < 32 * 2**20
