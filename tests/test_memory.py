"""The memory tracker counts live storage bytes exactly: allocations, frees, views and inputs."""
from __future__ import annotations

import torch

from sharding.memory import MemoryTracker


def test_counts_allocations_and_frees_exactly():
    x = torch.ones(1000, dtype=torch.float64)  # 8000 bytes, alive before the block
    with MemoryTracker() as mem:
        mem.track({"x": x, "again": x})          # the same storage twice counts once
        assert mem.live_bytes == 8000
        y = x * 2                                 # +8000
        z = y.view(10, 100).t()                   # a view: +0
        w = z.sum(0)                              # +10 float64 = 80
        del y, z                                  # y's storage is freed (z was its only other reference)
        assert mem.live_bytes == 8000 + 80
        del w
    assert mem.peak_bytes == 8000 + 8000 + 80
    assert mem.live_bytes == 8000


def test_reset_peak_starts_from_live_bytes():
    with MemoryTracker() as mem:
        a = torch.zeros(256, dtype=torch.float32)  # 1024 bytes
        b = torch.zeros(512, dtype=torch.float32)  # 2048 bytes
        del b
        mem.reset_peak()
        assert mem.peak_bytes == 1024
        c = a + 1
    assert mem.peak_bytes == 2048 and c.numel() == 256


def test_chain_of_temporaries_peaks_at_the_largest_overlap():
    def f(x):
        h = x @ x          # 64x64 float32 = 16384
        h = torch.relu(h)  # a second 16384 while the first is still referenced by the expression
        return h.sum()

    x = torch.randn(64, 64)
    with MemoryTracker() as mem:
        mem.track(x)
        f(x)
    assert mem.peak_bytes == 3 * 16384
