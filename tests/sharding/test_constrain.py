"""`constrain(x, names, other_axes="keep")` binds only the mesh axes its names map to: a model can
state a layout change for the strategies that want it (Ulysses' head-major attention) and stay a
no-op for the rest; the default replicates every axis the names leave unmapped."""
from __future__ import annotations

import pytest
import torch

from sharding import Mesh, P, constrain, jit, shard

MESH = Mesh.abstract({"dp": 2, "tp": 2})


def _x():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _lowered(other_axes, rules):
    def fn(x):
        return torch.tanh(constrain(x, ("batch", "heads"), other_axes=other_axes))

    step = jit(fn, mesh=MESH, in_specs=(P("dp", "tp"),), out_specs=P("dp", "tp"), logical_rules=rules,
               data_argnums=0, data_axes=("dp",), bucket_bytes=0)
    return step.lower(shard(_x(), P("dp", "tp"), MESH))


def test_keep_leaves_an_axis_the_names_do_not_map_as_propagated():
    assert _lowered("keep", {"batch": "dp"}).collectives == []


def test_by_default_an_unmapped_name_replicates_its_dim():
    kinds = [(c["kind"], c["axes"]) for c in _lowered("replicate", {"batch": "dp"}).collectives]
    assert ("all_gather", ("tp",)) in kinds


def test_keep_still_binds_the_axes_the_names_map():
    """batch on tp moves x's tp split from dim 1 to dim 0: an all-to-all; dp, unnamed, is untouched."""
    step = jit(lambda x: torch.tanh(constrain(x, ("batch", "heads"), other_axes="keep")), mesh=MESH,
               in_specs=(P(None, "tp"),), out_specs=P("tp", None), logical_rules={"batch": "tp"},
               data_argnums=0, data_axes=("dp",), bucket_bytes=0)
    lowered = step.lower(shard(_x(), P(None, "tp"), MESH))
    assert [(c["kind"], c["axes"]) for c in lowered.collectives] == [("all_to_all", ("tp",))]


def test_an_unknown_other_axes_value_is_an_error():
    with pytest.raises(ValueError, match="other_axes must be 'replicate' or 'keep'"):
        constrain(_x(), ("batch",), other_axes="free")
