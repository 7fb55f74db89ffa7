"""Layouts, reshape groups and redistribution plans, tested alone."""
from __future__ import annotations

from sharding.insert import plan_steps
from sharding.layout import PARTIAL, PARTIAL_MAX, REPLICATE, Layout, layout_from_spec
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
