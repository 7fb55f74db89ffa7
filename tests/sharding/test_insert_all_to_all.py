"""Insert: `Shard(i) -> Shard(j)` on one mesh axis is one all-to-all (not a gather plus a slice)."""
from __future__ import annotations

import pytest
import torch

from functional_parallel.launch import spawn
from sharding import Mesh, P, constrain, jit, shard, unshard
from sharding.insert import plan_steps
from sharding.layout import REPLICATE, Layout


def test_plan_is_one_exchange_when_no_other_axis_splits_either_dim():
    assert plan_steps(Layout((0, REPLICATE)), Layout((1, REPLICATE))) == [("all_to_all", 0, (0, 1))]
    # another axis already splits the target dim: gather, then slice (nested blocks)
    assert [k for k, *_ in plan_steps(Layout((0, 1)), Layout((1, REPLICATE)))] != ["all_to_all"]


def _transpose_split(x):
    y = constrain(torch.tanh(x), P(None, "sp"))   # sequence split -> feature split (Ulysses' exchange)
    return (y * y).sum(dim=0)


def _lower(mesh):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    step = jit(_transpose_split, mesh=mesh, in_specs=(P("sp"),), out_specs=P("sp"))
    local = shard(x, P("sp"), mesh)
    return step.lower(local), local, x


def test_lowering_logs_one_all_to_all():
    lowered, _, _ = _lower(Mesh.abstract({"sp": 2}))
    assert [(c["kind"], c["bytes"]) for c in lowered.collectives] == [("all_to_all", 4 * 6 * 8)]


def _run(rank, world):
    mesh = Mesh({"sp": 2})
    lowered, local, _ = _lower(mesh)
    return unshard(lowered.run(local), P("sp"), mesh)


@pytest.mark.slow
def test_all_to_all_on_two_ranks_equals_one_process():
    x = _lower(Mesh.abstract({"sp": 2}))[2]
    for got in spawn(_run, 2, timeout_s=120):
        assert torch.allclose(got, _transpose_split(x), rtol=0, atol=1e-12)
