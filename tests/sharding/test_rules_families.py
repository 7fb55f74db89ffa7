"""Each rule family alone, on graphs of a few nodes lowered on an abstract mesh (no processes): the
output layout a rule picks and the collectives it asks for (docs/rules.md, rule 4)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sharding import Mesh, P, Partial, PropagationError, Replicate, Shard, chunked, constrain, jit, shard
from sharding.layout import layout_of

MESH = Mesh.abstract({"tp": 2})


def _lower(fn, args, in_specs, out_specs):
    step = jit(fn, mesh=MESH, in_specs=in_specs, out_specs=out_specs, bucket_bytes=0)
    return step.lower(*(shard(a, s, MESH) for a, s in zip(args, in_specs)))


def _layout_of(lowered, target):
    """The propagated layout (tp placement) of the first node calling `target` in the global graph."""
    node = next(n for n in lowered.global_graph.graph.nodes if n.target is target)
    layout = layout_of(node)
    return layout[0].placements[0] if isinstance(layout, tuple) else layout.placements[0]  # first output


def _kinds(lowered):
    return [(c["kind"], c.get("op", "sum")) for c in lowered.collectives]


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


aten = torch.ops.aten


# -- contractions ------------------------------------------------------------------------------
def test_matmul_split_on_a_kept_index_carries_to_the_output():
    lowered = _lower(lambda x, w: x @ w, (_x(4, 8), _x(8, 6)), (P(), P(None, "tp")), P(None, "tp"))
    assert _layout_of(lowered, aten.mm.default) == Shard(1) and lowered.collectives == []


def test_matmul_split_on_the_contracted_index_is_partial_then_one_all_reduce():
    lowered = _lower(lambda x, w: x @ w, (_x(4, 8), _x(8, 6)), (P(None, "tp"), P("tp")), P())
    assert _layout_of(lowered, aten.mm.default) == Partial("sum")
    assert _kinds(lowered) == [("all_reduce", "sum")]


def test_bmm_batch_split_on_both_operands_needs_nothing():
    lowered = _lower(torch.bmm, (_x(4, 3, 5), _x(4, 5, 2)), (P("tp"), P("tp")), P("tp"))
    assert _layout_of(lowered, aten.bmm.default) == Shard(0) and lowered.collectives == []


# -- reductions --------------------------------------------------------------------------------
def test_sum_over_a_split_dim_is_partial_sum():
    lowered = _lower(lambda x: x.sum(1), (_x(4, 8),), (P(None, "tp"),), P())
    assert _layout_of(lowered, aten.sum.dim_IntList) == Partial("sum")
    assert _kinds(lowered) == [("all_reduce", "sum")]


def test_max_over_a_split_dim_is_partial_max():
    lowered = _lower(lambda x: x.amax(1), (_x(4, 8),), (P(None, "tp"),), P())
    assert _layout_of(lowered, aten.amax.default) == Partial("max")
    assert _kinds(lowered) == [("all_reduce", "max")]


def test_sum_over_another_dim_keeps_the_split():
    lowered = _lower(lambda x: x.sum(0), (_x(4, 8),), (P(None, "tp"),), P("tp"))
    assert _layout_of(lowered, aten.sum.dim_IntList) == Shard(0) and lowered.collectives == []


# -- pointwise ---------------------------------------------------------------------------------
def test_pointwise_broadcast_keeps_the_split_of_the_larger_operand():
    lowered = _lower(lambda x, b: torch.tanh(x + b), (_x(4, 8), _x(8)), (P(None, "tp"), P("tp")), P(None, "tp"))
    assert _layout_of(lowered, aten.tanh.default) == Shard(1) and lowered.collectives == []


def test_a_partial_stays_partial_through_a_linear_op_and_is_reduced_by_a_nonlinear_one():
    fn = lambda x, w: torch.tanh((x @ w) * 2.0)  # noqa: E731
    lowered = _lower(fn, (_x(4, 8), _x(8, 6)), (P(None, "tp"), P("tp")), P())
    assert _layout_of(lowered, aten.mul.Tensor) == Partial("sum")
    assert _layout_of(lowered, aten.tanh.default) == Replicate()
    assert _kinds(lowered) == [("all_reduce", "sum")]


# -- views -------------------------------------------------------------------------------------
def test_a_split_leading_its_group_survives_a_reshape():
    # [4, 8] split on dim 1 -> [4, 2, 4]: the split dim 1 leads its group (8 -> 2 x 4)
    lowered = _lower(lambda x: x.reshape(4, 2, 4) * 1.5, (_x(4, 8),), (P(None, "tp"),), P(None, "tp"))
    assert _layout_of(lowered, aten.view.default) == Shard(1) and lowered.collectives == []


def test_transpose_moves_the_split_with_its_dim():
    lowered = _lower(lambda x: x.t() * 1.5, (_x(4, 8),), (P(None, "tp"),), P("tp"))
    assert _layout_of(lowered, aten.t.default) == Shard(0) and lowered.collectives == []


# -- along dims, normalizations ------------------------------------------------------------------
def test_cumsum_keeps_a_split_on_another_dim():
    lowered = _lower(lambda x: x.cumsum(1), (_x(4, 8),), (P("tp"),), P("tp"))
    assert _layout_of(lowered, aten.cumsum.default) == Shard(0) and lowered.collectives == []


def test_softmax_keeps_a_split_on_a_batch_dim():
    lowered = _lower(lambda x: torch.softmax(x, -1), (_x(4, 8),), (P("tp"),), P("tp"))
    assert _layout_of(lowered, aten._softmax.default) == Shard(0) and lowered.collectives == []


def test_layer_norm_keeps_a_split_on_a_leading_dim():
    lowered = _lower(lambda x: F.layer_norm(x, (8,)), (_x(4, 8),), (P("tp"),), P("tp"))
    assert _layout_of(lowered, aten.native_layer_norm.default) == Shard(0) and lowered.collectives == []


# -- creation, replicated inputs (rule 0) -----------------------------------------------------------
def test_ops_on_replicated_inputs_need_no_rule_and_no_collective():
    fn = lambda x: x.masked_fill(torch.triu(torch.ones(8, 8, dtype=torch.bool), 1), 0.0)  # noqa: E731
    lowered = _lower(fn, (_x(8, 8),), (P(),), P())
    assert _layout_of(lowered, aten.triu.default) == Replicate() and lowered.collectives == []


def test_like_ops_follow_their_input_split():
    lowered = _lower(lambda x: torch.ones_like(x) + x, (_x(4, 8),), (P("tp"),), P("tp"))
    assert _layout_of(lowered, aten.ones_like.default) == Shard(0) and lowered.collectives == []


# -- conflicts (rule 5) ----------------------------------------------------------------------------
def test_two_activations_split_differently_name_the_constrain_that_settles_it():
    data = Mesh.abstract({"tp": 2})
    step = jit(lambda x, y: x + y.t(), mesh=data, in_specs=(P("tp"), P("tp")), out_specs=P())
    with pytest.raises(PropagationError, match=r"constrain\("):
        step.lower(shard(_x(4, 4), P("tp"), data), shard(_x(4, 4), P("tp"), data))


# -- no silent gather on a model axis (rule 9) -----------------------------------------------------
@pytest.mark.parametrize("fn, name", [
    (lambda x: torch.softmax(x, -1), "softmax"),
    (lambda x: F.layer_norm(x, (8,)), "layer_norm"),
    (lambda x: x.cumsum(-1), "cumsum"),
    (lambda x: x.argmax(-1).to(x.dtype), "argmax"),
    (lambda x: x.sort(-1).values, "sort"),
])
def test_an_op_that_needs_a_model_axis_split_dim_whole_names_the_constrain(fn, name):
    with pytest.raises(PropagationError, match=r"whole on model axis 'tp'.*rule 9.*constrain\(<\w+>, P\(\)\)"
                                               r".*test_rules_families\.py"):
        _lower(fn, (_x(4, 8),), (P(None, "tp"),), P())


def test_the_constrain_the_error_names_makes_the_gather_explicit():
    def fn(x):
        return torch.softmax(constrain(x, P()), -1)
    lowered = _lower(fn, (_x(4, 8),), (P(None, "tp"),), P())
    assert _kinds(lowered) == [("all_gather", "sum")]


def test_on_a_data_axis_a_worked_dim_is_gathered_by_the_op():
    data = Mesh.abstract({"dp": 2})
    step = jit(lambda x: x.cumsum(-1), mesh=data, in_specs=(P(None, "dp"),), out_specs=P(), data_argnums=0)
    lowered = step.lower(shard(_x(4, 8), P(None, "dp"), data))
    assert [c["kind"] for c in lowered.collectives] == ["all_gather"]


def test_rule_5_and_the_reshape_clause_still_move_an_activation_on_a_model_axis():
    mesh = Mesh.abstract({"dp": 2, "tp": 2})  # x is data split on its rows over tp (SP), w a column-parallel weight
    step = jit(lambda x, w: x @ w, mesh=mesh, in_specs=(P("tp"), P(None, "tp")), out_specs=P(None, "tp"),
               data_argnums=0, data_axes=("dp",))
    sequence_parallel = step.lower(shard(_x(4, 8), P("tp"), mesh), shard(_x(8, 6), P(None, "tp"), mesh))
    assert [(c["kind"], c["axes"]) for c in sequence_parallel.collectives] == [("all_gather", ("tp",))]
    merged_behind = _lower(lambda x: x.reshape(8, 4), (_x(2, 4, 4),), (P(None, "tp"),), P())
    assert _kinds(merged_behind) == [("all_gather", "sum")]


def test_a_chunked_split_an_op_cannot_place_is_not_gathered_silently():
    with pytest.raises(PropagationError, match=r"whole on model axis 'tp', where it is Shard\(1, chunks=2\).*rule 9"):
        _lower(lambda x: torch.softmax(x, 1), (_x(4, 8),), (P(None, chunked("tp", 2)),), P())


def test_a_rule_for_plain_splits_carries_a_chunked_split_through_an_op_that_keeps_positions():
    """softmax along dim 0 keeps dim 1's positions: a chunked split of dim 1 passes as it is."""
    lowered = _lower(lambda x: torch.softmax(x, 0), (_x(4, 8),), (P(None, chunked("tp", 2)),),
                     P(None, chunked("tp", 2)))
    assert _kinds(lowered) == []


def test_a_partial_before_an_unflattening_view_is_reduce_scattered_into_the_views_split():
    """GPT-2's Conv1D: `addmm` over [b*s, d] tokens, viewed back to [b, s, d] and added to a residual
    whose seq dim SP splits. The residual's hint passes back through the view as a split of each
    sequence's piece of the flat dim, so the row-parallel Partial is reduce-scattered there (as
    Megatron SP does), not all-reduced and sliced."""
    b, s, k, d = 2, 4, 8, 6

    def conv1d_then_residual(x, w, bias, residual):
        residual = constrain(residual, ("batch", "seq", "embed"))
        y = torch.addmm(bias, x.reshape(-1, k), w).view(b, s, d)
        return constrain(residual + y, ("batch", "seq", "embed")).sum()

    mesh = Mesh.abstract({"tp": 2})
    x, w, bias, residual = torch.randn(b, s, k), torch.randn(k, d), torch.randn(d), torch.randn(b, s, d)
    lowered = jit(conv1d_then_residual, mesh=mesh, in_specs=(P(None, None, "tp"), P("tp"), P(), P()),
                  out_specs=P(), logical_rules={"seq": "tp"}).lower(
        shard(x, P(None, None, "tp"), mesh), shard(w, P("tp"), mesh), bias, residual)
    assert [(c["kind"], tuple(c["shape"])) for c in lowered.collectives] == [("reduce_scatter", (b * s, d)),
                                                                           ("all_reduce", ())]


def test_pieces_chunked_alike_along_another_dim_concatenate_without_communication():
    """RoPE's halves under a striped sequence: cat along the feature dim keeps the chunked rows."""
    lowered = _lower(lambda x: torch.cat([x[:, :4] * 2, x[:, 4:]], dim=-1), (_x(8, 8),), (P(chunked("tp", 2)),),
                     P(chunked("tp", 2)))
    assert _kinds(lowered) == []
