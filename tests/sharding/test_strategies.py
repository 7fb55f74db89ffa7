"""Every strategy x {GPT, Llama} on 4 gloo ranks equals the single-process reference (float64).

One spawn per model runs all strategies, so the processes start once.
"""
from __future__ import annotations

import pytest
import torch

from functional_parallel.launch import spawn

from .equivalence import MESHES, max_error, reference, run_strategy

STRATEGIES = list(MESHES)
TOLERANCE = 1e-9


def _all_strategies(rank, world, arch):
    return {name: run_strategy(rank, world, arch, name) for name in STRATEGIES}


@pytest.fixture(scope="module", params=["gpt", "llama"])
def outcome(request):
    arch = request.param
    return arch, reference(arch), spawn(_all_strategies, 4, arch, timeout_s=300)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_equals_reference(outcome, strategy):
    arch, ref, per_rank = outcome
    for rank, results in enumerate(per_rank):
        got = results[strategy]
        losses = torch.stack(got["losses"])
        assert torch.allclose(losses, torch.stack(ref["losses"]), rtol=0, atol=TOLERANCE), (arch, strategy, rank)
        grad_error, where = max_error(got["grads"], ref["grads"])
        assert grad_error < TOLERANCE, f"{arch}/{strategy} rank {rank}: grad {where} off by {grad_error}"
        param_error, where = max_error(got["params"], ref["params"])
        assert param_error < TOLERANCE, f"{arch}/{strategy} rank {rank}: after 3 steps {where} off by {param_error}"


@pytest.mark.slow
def test_compile_time_per_rank(outcome):
    """Tracing + partitioning a tiny model is quick even with 4 ranks sharing 2 cores."""
    arch, _, per_rank = outcome
    for results in per_rank:
        for name, got in results.items():
            assert got["compile_s"] < 30, (arch, name, got["timings"])
