"""Random ops on 4 gloo ranks (dp=2 x tp=2): a dropout mask is the same on every rank holding the
same block and independent between blocks, drawn as written (a split value) or under `torch.func.grad`
(a global mask sliced); the block seeding is visible in the lowered graph."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from functional_parallel.launch import spawn
from sharding import Mesh, P, jit, shard, unshard
from sharding.random_ops import rank_seeded

SPLIT = P(None, "tp")


def _dropout(x):
    return F.dropout(x, 0.5, training=True)


def _scaled_dropout_loss(w, x):
    return F.dropout(x * w, 0.5, training=True).sum()


def _run(rank, world):
    torch.manual_seed(0)  # as the trainer does: the generator in one state on every rank
    mesh = Mesh({"dp": 2, "tp": 2})
    x = torch.ones(4, 8)
    out = {}
    for name, spec in (("split", SPLIT), ("replicated", P())):
        step = jit(_dropout, mesh=mesh, in_specs=(spec,), out_specs=spec)
        local = step(shard(x, spec, mesh))
        out[name] = {"local": local, "global": unshard(local, spec, mesh)}
    grad = jit(torch.func.grad(_scaled_dropout_loss), mesh=mesh, in_specs=(SPLIT, P()), out_specs=SPLIT)
    out["grad"] = grad(shard(torch.ones(4, 8), SPLIT, mesh), x)
    out["coordinate"] = mesh.coordinate
    return out


@pytest.fixture(scope="module")
def per_rank():
    return spawn(_run, 4, timeout_s=120)


def test_lowered_dropout_of_a_split_value_is_seeded_by_block():
    mesh = Mesh.abstract({"dp": 2, "tp": 2})
    x = torch.ones(4, 8)
    split = jit(_dropout, mesh=mesh, in_specs=(SPLIT,), out_specs=SPLIT).lower(shard(x, SPLIT, mesh))
    whole = jit(_dropout, mesh=mesh, in_specs=(P(),), out_specs=P()).lower(x)
    assert [n.target for n in split.graph.graph.nodes].count(rank_seeded) == 1
    assert rank_seeded not in [n.target for n in whole.graph.graph.nodes]  # replicated: drawn as written


@pytest.mark.slow
def test_ranks_holding_the_same_block_draw_the_same_mask_and_blocks_differ(per_rank):
    by_tp = {}
    for result in per_rank:
        by_tp.setdefault(result["coordinate"][1], []).append(result["split"]["local"])
    for blocks in by_tp.values():  # dp peers hold the same tp block: the same mask
        assert torch.equal(blocks[0], blocks[1])
    assert not torch.equal(by_tp[0][0], by_tp[1][0])  # the two tp blocks: independent masks
    kept = per_rank[0]["split"]["global"]
    assert set(kept.unique().tolist()) <= {0.0, 2.0} and 0 < (kept == 0).sum() < kept.numel()
    replicated = [r["replicated"]["local"] for r in per_rank]
    assert all(torch.equal(replicated[0], other) for other in replicated[1:])


@pytest.mark.slow
def test_a_mask_drawn_under_grad_agrees_where_ranks_share_a_block(per_rank):
    """torch.func.grad draws dropout as one global mask (bernoulli of an expanded scalar), which every
    rank draws alike and slices: dp peers get the same gradient block, tp blocks are not copies."""
    grads = {r["coordinate"]: r["grad"] for r in per_rank}
    assert torch.equal(grads[(0, 0)], grads[(1, 0)]) and torch.equal(grads[(0, 1)], grads[(1, 1)])
    assert not torch.equal(grads[(0, 0)], grads[(0, 1)])
