"""Pipelined strategies on real gloo ranks equal the single-process reference (float64, 3 AdamW steps).

Every pipeline strategy file, every schedule and both models are covered by the default runs
below (one spawn per world size, so the processes start once). `FP_PIPELINE_MATRIX=1` runs the
whole matrix instead: every strategy x schedule x model (a few minutes on 2 cores).
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from functional_parallel.launch import spawn

from .equivalence import max_error
from .pipeline_problem import reference, run_pipeline

TOLERANCE = 1e-9
DP_PP = {"dp": 2, "pp": 2}
PP4 = {"dp": 1, "pp": 4}
DP_PP_TP = {"dp": 2, "pp": 2, "tp": 2}
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1")


def _run(arch, strategy, shape, schedule, microbatches=2):
    """(arch, strategy, mesh, schedule, micro-batches, virtual, layers): interleaving puts two chunks
    on each rank, so it needs twice the layers."""
    virtual = 2 if schedule == "interleaved_1f1b" else 1
    layers = max(2, shape["pp"] * virtual)
    return arch, strategy, tuple(shape.items()), schedule, max(microbatches, shape["pp"] if virtual > 1 else 1), \
        virtual, layers


DEFAULT = {
    4: [_run("gpt", "pp", DP_PP, "gpipe"), _run("llama", "pp", DP_PP, "1f1b"),
        _run("gpt", "pp", DP_PP, "interleaved_1f1b"), _run("llama", "zero3_pp", DP_PP, "zb_h1")],
    "4 stages": [_run("llama", "pp", PP4, "zb_h1", 4)],
    8: [_run("gpt", "dp_tp_pp", DP_PP_TP, "1f1b"), _run("llama", "zero1_tp_pp", DP_PP_TP, "gpipe")],
}
MATRIX = {
    4: [_run(a, s, DP_PP, k) for a, s, k in itertools.product(("gpt", "llama"), ("pp", "zero3_pp"), SCHEDULES)],
    "4 stages": [_run(a, "pp", PP4, k, 4) for a, k in itertools.product(("gpt", "llama"), SCHEDULES)
                 if k != "interleaved_1f1b"],
    8: [_run(a, s, DP_PP_TP, k) for a, s, k in itertools.product(("gpt", "llama"), ("dp_tp_pp", "zero1_tp_pp"),
                                                                   SCHEDULES)],
}
RUNS = MATRIX if os.environ.get("FP_PIPELINE_MATRIX") else DEFAULT
CASES = [(group, run) for group, runs in RUNS.items() for run in runs]


def _spawn(runs):
    shape = dict(runs[0][2])
    world = 1
    for size in shape.values():
        world *= size
    return spawn(_ranks, world, [(a, s, dict(m), k, n, v, l) for a, s, m, k, n, v, l in runs], timeout_s=600)


def _ranks(rank, world, runs):
    results = run_pipeline(rank, world, [(a, s, m, k, n, v, l) for a, s, m, k, n, v, l in runs])
    return {(a, s, tuple(m.items()), k, n, v, l): value for (a, s, m, k, n, v, l), value in
            zip(runs, results)}


@pytest.fixture(scope="module")
def outcomes():
    return {group: _spawn(runs) for group, runs in RUNS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("group,run", CASES, ids=[f"{r[1]}-{r[0]}-{r[3]}-pp{dict(r[2])['pp']}" for _, r in CASES])
def test_pipeline_equals_reference(outcomes, group, run):
    arch, strategy, _, schedule, microbatches, _, layers = run
    ref = reference(arch, microbatches, layers)
    for rank, results in enumerate(outcomes[group]):
        got = results[run]
        losses = torch.stack(got["losses"])
        assert torch.allclose(losses, torch.stack(ref["losses"]), rtol=0, atol=TOLERANCE), (run, rank)
        error, where = max_error(got["grads"], ref["grads"])
        assert error < TOLERANCE, f"{run} rank {rank}: grad {where} off by {error}"
        error, where = max_error(got["params"], ref["params"])
        assert error < TOLERANCE, f"{run} rank {rank}: after 3 steps {where} off by {error}"
        assert any(r["kind"] == "p2p" for r in got["collectives"]), "a pipeline sends between its stages"
