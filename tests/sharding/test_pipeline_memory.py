"""A pipelined step's predicted peak (`lower().cost["peak_bytes"]`, this rank's program) equals the
one `MemoryTracker` measures on real gloo ranks, for GPipe (every micro-batch alive on the first
stage) and 1F1B (at most p)."""
from __future__ import annotations

import pytest

from functional_parallel.launch import spawn
from sharding import Mesh

from .equivalence import measured_peaks
from .pipeline_problem import compile_pipeline

SCHEDULES = ("gpipe", "1f1b", "zb_h1")
TOLERANCE = 0.05  # as tests/sharding/test_memory_peak.py: gloo frees a finished transfer's buffers a little late


def _measure(rank, world):
    found = {}
    for schedule in SCHEDULES:
        compiled, local, _ = compile_pipeline("gpt", "pp", Mesh({"dp": 1, "pp": world}), schedule, 4)
        lowered = compiled.lower(*local)
        lowered.run(*local)  # a first run: lazily made process-group state is not counted
        found[schedule] = {"predicted": lowered.cost["peak_bytes"], "measured": min(measured_peaks(lowered, local))}
    return found


@pytest.fixture(scope="module")
def peaks():
    return spawn(_measure, 2, timeout_s=300)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipelined_peak_predicted_equals_measured(peaks, schedule):
    for rank, found in enumerate(peaks):
        predicted, measured = found[schedule]["predicted"], found[schedule]["measured"]
        assert abs(measured - predicted) <= TOLERANCE * predicted, (schedule, rank, predicted, measured)


@pytest.mark.slow
def test_gpipe_holds_more_than_1f1b_on_the_first_stage(peaks):
    first = peaks[0]
    assert first["gpipe"]["measured"] > first["1f1b"]["measured"]
