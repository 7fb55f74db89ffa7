"""`fp::leading_matmul`: a projection `x @ w` of [b, s, d] tokens stays one op, so a split of the
sequence (or any leading dim) crosses it without a gather; its weight gradient contracts every
leading dim at once (`fp::leading_contract`)."""
from __future__ import annotations

import torch

from sharding import Mesh, P, jit, shard
from sharding.batched_matmul import LEADING_CONTRACT, LEADING_MATMUL, KeepBatchDims
from sharding.trace import trace

MESH = Mesh.abstract({"tp": 2})


def _operands():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True))


def _loss(x, w):
    return torch.tanh(x @ w).pow(2).sum()


def test_value_and_gradients_are_torch_matmul():
    x, w = _operands()
    with KeepBatchDims():
        ours = torch.func.grad(_loss, argnums=(0, 1))(x, w)
    theirs = torch.func.grad(_loss, argnums=(0, 1))(x, w)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_projection_and_its_weight_gradient_trace_as_one_op_each():
    x, w = (t.detach() for t in _operands())
    graph = trace(torch.func.grad(_loss, argnums=(0, 1)), (x, w), (P(None, "tp"), P()), MESH).graph_module.graph
    targets = [n.target for n in graph.nodes]
    assert LEADING_MATMUL in targets and LEADING_CONTRACT in targets
    assert torch.ops.aten.mm.default not in targets and torch.ops.aten.view.default not in targets


def _lowered(x_spec, w_spec, out_spec):
    x, w = (t.detach() for t in _operands())
    step = jit(lambda x, w: x @ w, mesh=MESH, in_specs=(x_spec, w_spec), out_specs=out_spec,
               data_argnums=0, data_axes=(), bucket_bytes=0)
    return step.lower(shard(x, x_spec, MESH), shard(w, w_spec, MESH))


def test_a_sequence_split_crosses_a_replicated_projection_without_communication():
    lowered = _lowered(P(None, "tp"), P(), P(None, "tp"))
    assert lowered.collectives == []


def test_a_sequence_split_meets_a_column_split_weight_by_rule_5():
    """On a model axis the parameter keeps its split: the tokens are gathered (Megatron SP)."""
    lowered = _lowered(P(None, "tp"), P(None, "tp"), P(None, None, "tp"))
    assert [(c["kind"], c["shape"]) for c in lowered.collectives] == [("all_gather", (2, 6, 8))]


def test_the_weight_gradient_of_sequence_split_tokens_is_a_partial_sum():
    x, w = (t.detach() for t in _operands())
    step = jit(torch.func.grad(_loss, argnums=1), mesh=MESH, in_specs=(P(None, "tp"), P()), out_specs=P(),
               data_argnums=0, data_axes=(), bucket_bytes=0)
    lowered = step.lower(shard(x, P(None, "tp"), MESH), shard(w, P(), MESH))
    assert [(c["kind"], c["shape"]) for c in lowered.collectives] == [("all_reduce", (8, 4))]
