"""`fp::batched_matmul`: a matmul over [b, h, s, d] operands keeps its batch dims through tracing,
so a head split carries through attention scores without a gather (JAX's dot_general batch dims)."""
from __future__ import annotations

import torch

from sharding import Mesh, P, jit, shard
from sharding.batched_matmul import BATCHED_MATMUL, KeepBatchDims
from sharding.trace import trace

SPECS = (P(None, "tp"), P(None, "tp"))


def _scores(q, k):
    return torch.softmax(q @ k.transpose(-1, -2), dim=-1)


def _operands():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64, requires_grad=True))


def test_value_and_gradient_are_torch_matmul():
    q, k = _operands()
    with KeepBatchDims():
        ours = torch.func.grad(lambda q, k: (q @ k.transpose(-1, -2)).pow(2).sum(), argnums=(0, 1))(q, k)
    theirs = torch.func.grad(lambda q, k: (q @ k.transpose(-1, -2)).pow(2).sum(), argnums=(0, 1))(q, k)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_four_dim_matmul_traces_as_one_op_and_three_dim_as_bmm():
    mesh = Mesh.abstract({"tp": 2})
    q, k = (x.detach() for x in _operands())
    targets = [n.target for n in trace(_scores, (q, k), SPECS, mesh).graph_module.graph.nodes]
    assert BATCHED_MATMUL in targets and torch.ops.aten.bmm.default not in targets
    flat = trace(_scores, (q[0], k[0]), SPECS, mesh).graph_module.graph.nodes
    assert torch.ops.aten.bmm.default in [n.target for n in flat]


def test_a_head_split_carries_through_scores_and_their_gradient_without_collectives():
    mesh = Mesh.abstract({"tp": 2})
    q, k = (x.detach() for x in _operands())
    step = jit(torch.func.grad(lambda q, k: _scores(q, k).pow(2).sum(), argnums=(0, 1)), mesh=mesh,
               in_specs=SPECS, out_specs=SPECS)
    lowered = step.lower(*(shard(x, P(None, "tp"), mesh) for x in (q, k)))
    assert lowered.collectives == []
