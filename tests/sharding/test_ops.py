"""The op registry: one entry per op holds every fact a stage reads."""
from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from sharding import ops
from sharding.cost import VIEW_OPS
from sharding.rules import RULES, load_all

aten = torch.ops.aten


def test_views_move_values_and_have_placement_rules():
    load_all()
    for op, entry in ops.REGISTRY.items():
        if entry.view:
            assert entry.moves_values and op in RULES, op
    assert VIEW_OPS == {op for op, entry in ops.REGISTRY.items() if entry.view}


def test_zeros_by_construction_read_the_fill_argument():
    graph = make_fx(lambda x: (torch.full((2,), 0.0) + torch.full((2,), 1.0) + x.new_zeros(2)))(torch.ones(2)).graph
    fills = [n for n in graph.nodes if n.op == "call_function" and n.target in (aten.full.default, aten.new_zeros.default)]
    assert [ops.creates_zeros(n) for n in fills] == [True, False, True]


def test_shape_arguments_are_named_for_every_creation_op_with_a_size():
    for op in (aten.zeros.default, aten.new_zeros.default, aten.view.default, aten.expand.default):
        assert ops.facts(op).shape_arg is not None, op
    assert ops.facts(aten.add.Tensor) == ops.NO_FACTS
