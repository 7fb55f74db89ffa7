"""Elementwise rule: a Partial is reduced before a dtype cast, once, in the producer's precision."""
from __future__ import annotations

import pytest

from functional_parallel import planner
from functional_parallel.models import build
from functional_parallel.parallel import Strategy
from sharding.tree import leaf_paths


@pytest.mark.parametrize("strategy,kind", [("dp", "all_reduce"), ("zero2", "reduce_scatter")])
def test_bf16_gradient_is_reduced_once_in_bf16(strategy, kind):
    """The gradient norm casts each bf16 gradient to fp32; without reducing first, the cast copy and
    the Adam moments would each carry their own reduction of the same gradient (four per leaf)."""
    model = build("gpt", "tiny")
    lowered, params, _, _ = planner.lower_fake(model, Strategy.load(strategy), {"dp": 4}, 8,
                                               planner.PRECISIONS["bf16"])
    gradient_reductions = [r for r in lowered.collectives if r["kind"] == kind and r["shape"] != ()]
    assert len(gradient_reductions) == len(leaf_paths(params)[0])
    assert {r["dtype"] for r in gradient_reductions} == {"bfloat16"}
