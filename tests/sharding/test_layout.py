"""Layouts, reshape groups and redistribution plans, tested alone."""
from __future__ import annotations

import itertools

import pytest
import torch

from sharding import Mesh, jit, shard
from sharding.insert import plan_steps
from sharding.layout import PARTIAL, PARTIAL_MAX, REPLICATE, Layout, Shard, Strided, layout_from_spec
from sharding.rules.views import view_groups
from sharding.spec import P


def test_p_normalizes_entries():
    assert P(("dp",), None) == P("dp", None)
    assert P(["dp", "tp"]).axes_of(0) == ("dp", "tp")
    assert P("dp").axes_of(3) == ()


def test_layout_from_spec_and_back():
    layout = layout_from_spec(P(None, ("dp", "tp")), (4, 8), ("dp", "tp"), (2, 2))
    assert layout.placements == (1, 1)
    assert layout.local_shape((4, 8), (2, 2)) == [4, 2]
    assert layout.to_spec(2, ("dp", "tp")) == P(None, ("dp", "tp"))


def test_size_one_axis_splits_nothing():
    assert layout_from_spec(P("tp"), (3,), ("dp", "tp"), (2, 1)).placements == (REPLICATE, REPLICATE)


def test_view_groups_merge_and_split():
    assert view_groups((8, 16, 32), (128, 32)) == [([0, 1], [0]), ([2], [1])]
    assert view_groups((128, 32), (8, 16, 4, 8)) == [([0], [0, 1]), ([1], [2, 3])]
    assert view_groups((4, 1, 8), (4, 8)) == [([0], [0]), ([1, 2], [1])]


def test_plan_steps_per_axis():
    assert plan_steps(Layout((0, REPLICATE)), Layout((REPLICATE, REPLICATE))) == [("all_gather", 0, 0)]
    assert plan_steps(Layout((PARTIAL,)), Layout((REPLICATE,))) == [("all_reduce", (0,), "sum")]
    assert plan_steps(Layout((PARTIAL,)), Layout((1,))) == [("reduce_scatter", 0, 1)]
    assert plan_steps(Layout((REPLICATE,)), Layout((0,))) == [("local_slice", 0, 0)]


def test_a_partial_over_several_axes_is_one_all_reduce_over_their_joint_group():
    assert plan_steps(Layout((PARTIAL, PARTIAL)), Layout((REPLICATE, REPLICATE))) == [("all_reduce", (0, 1), "sum")]
    # a max and a sum are two reductions; a reduce-scatter stays on its own axis
    assert plan_steps(Layout((PARTIAL, PARTIAL_MAX)), Layout((REPLICATE, REPLICATE))) == [
        ("all_reduce", (0,), "sum"), ("all_reduce", (1,), "max")]
    assert plan_steps(Layout((PARTIAL, PARTIAL)), Layout((0, REPLICATE))) == [
        ("reduce_scatter", 0, 0), ("all_reduce", (1,), "sum")]


def test_plan_steps_gathers_inner_axis_first_and_slices_outer_first():
    # dim 0 split by (dp, tp) -> replicated: the inner axis steps aside first.
    assert plan_steps(Layout((0, 0)), Layout((REPLICATE, REPLICATE))) == [("all_gather", 1, 0), ("all_gather", 0, 0)]
    # A new outer split on a dim the inner axis already splits: gather inner, split outer, re-split inner.
    assert plan_steps(Layout((PARTIAL, 0)), Layout((0, 0))) == [
        ("all_gather", 1, 0), ("reduce_scatter", 0, 0), ("local_slice", 1, 0)]


# -- axes listed out of mesh order (tp outer, dp inner: FSDP over TP) ------------------------------
def test_axes_out_of_mesh_order_nest_the_mesh_earlier_axis_inside():
    layout = layout_from_spec(P(("tp", "dp")), (8,), ("dp", "tp"), (2, 2))
    assert layout.placements == (Strided(0, 2), Shard(0))
    assert layout.local_shape((8,), (2, 2)) == [2]
    assert layout.to_spec(1, ("dp", "tp"), (2, 2)) == P(("tp", "dp"))


@pytest.mark.parametrize("order", list(itertools.permutations(("a", "b", "c"))))
def test_every_rank_holds_the_block_its_spec_order_names(order):
    """Rank (a, b, c) holds block index order[0]*4 + order[1]*2 + order[2] of a dim cut into 8."""
    axes = {"a": 2, "b": 2, "c": 2}
    full = torch.arange(16.0)
    for rank in range(8):
        mesh = Mesh.abstract(axes, rank=rank)
        coordinate = dict(zip(axes, mesh.coordinate))
        block = coordinate[order[0]] * 4 + coordinate[order[1]] * 2 + coordinate[order[2]]
        assert torch.equal(shard(full, P(order), mesh), full[2 * block:2 * block + 2]), (order, rank)


def test_gathering_the_inner_axis_of_a_nesting_is_one_plain_gather_and_the_outer_split_stays():
    nested = layout_from_spec(P(("tp", "dp")), (8,), ("dp", "tp"), (2, 2))
    tp_block = Layout((REPLICATE, Shard(0)))
    assert plan_steps(nested, tp_block, (2, 2)) == [("all_gather", 0, Shard(0))]
    assert plan_steps(Layout((PARTIAL, Shard(0))), nested, (2, 2)) == [("reduce_scatter", 0, Shard(0))]
    assert plan_steps(tp_block, nested, (2, 2)) == [("local_slice", 0, Shard(0))]
    mesh_order = layout_from_spec(P(("dp", "tp")), (8,), ("dp", "tp"), (2, 2))  # tp's block moves: tp steps aside
    assert [kind for kind, *_ in plan_steps(mesh_order, tp_block, (2, 2))] == ["all_gather", "all_gather", "local_slice"]


def test_a_bias_nested_in_its_tp_block_is_gathered_over_dp_only():
    mesh = Mesh.abstract({"dp": 2, "tp": 2})
    x, w, b = torch.randn(8, 16, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def step(w, b, x):
        return torch.func.grad_and_value(lambda w, b, x: torch.tanh(x @ w + b).sum(), argnums=(0, 1))(w, b, x)

    for spec, tp_collectives in ((P(("tp", "dp")), []), (P(("dp", "tp")), ["all_gather", "all_gather"])):
        lowered = jit(step, mesh=mesh, in_specs=(P("dp", "tp"), spec, P("dp")), out_specs=((P("dp", "tp"), spec), P()),
                      data_argnums=2, bucket_bytes=0).lower(shard(w, P("dp", "tp"), mesh), shard(b, spec, mesh),
                                                            shard(x, P("dp"), mesh))
        assert [c["kind"] for c in lowered.collectives if c["axes"] == ("tp",)] == tp_collectives
        assert "reduce_scatter" in [c["kind"] for c in lowered.collectives if c["axes"] == ("dp",)]
