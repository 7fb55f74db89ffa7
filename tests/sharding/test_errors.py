"""Bad input is a clear `ShardingError` at lower time: before any collective, on every rank."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from functional_parallel.launch import RankError, spawn
from sharding import Mesh, MeshError, P, PropagationError, SpecError, TraceError, chunked, jit, match, shard

MESH = Mesh.abstract({"dp": 2, "tp": 2})


def _loss(params, x):
    return ((x @ params["w"]) ** 2).sum()


def _lower(spec, params=None, x_spec=P("dp"), in_specs=None, fn=_loss):
    params = params if params is not None else {"w": torch.ones(8, 4)}
    x = torch.ones(4, 8)
    step = jit(fn, mesh=MESH, in_specs=in_specs if in_specs is not None else ({"w": spec}, x_spec), out_specs=P())
    return step.lower(params, x)


def test_unknown_axis():
    with pytest.raises(SpecError, match=r"w.*names mesh axis 'pp'.*mesh axes: \('dp', 'tp'\)"):
        _lower(P("pp", None))


def test_axis_used_twice():
    with pytest.raises(SpecError, match=r"uses mesh axis 'tp' twice"):
        _lower(P("tp", "tp"))


def test_spec_longer_than_tensor():
    with pytest.raises(SpecError, match=r"has 3 entries but the tensor has only 2 dims"):
        _lower(P(None, None, "tp"))


def test_dim_not_divisible_names_leaf_dim_and_sizes():
    params = {"blocks": [{"w": torch.ones(8, 6)}]}
    with pytest.raises(SpecError, match=r"blocks/0/w: dim 1 has size 6, not divisible by 4 .*sizes \(2, 2\)"):
        shard(params, P(None, ("dp", "tp")), MESH)


def test_spec_tree_not_matching_params():
    with pytest.raises(SpecError, match=r"spec tree does not match"):
        _lower(None, in_specs=({"v": P()}, P("dp")))


def test_in_specs_arity():
    with pytest.raises(SpecError, match=r"in_specs has 1 entries but the function got 2 arguments"):
        _lower(None, in_specs=(P(),))


def test_a_chunked_axis_out_of_mesh_order():
    with pytest.raises(SpecError, match=r"out of mesh order .* a chunked axis is listed in mesh order"):
        _lower(P((chunked("tp", 2), "dp"), None))


def test_op_without_rule_names_op_and_source_line():
    def uses_kthvalue(params, x):
        return torch.kthvalue(x @ params["w"], 1, dim=0).values.sum()  # THE-LINE

    with pytest.raises(PropagationError, match=r"no sharding rule for op aten\.kthvalue.*constrain its inputs to "
                                               r"P\(\).*test_errors\.py:\d+.*THE-LINE"):
        _lower(P(), fn=uses_kthvalue)


def test_op_without_rule_runs_where_its_inputs_are_replicated():
    """Rule 0: no rule is needed on an axis where every input is replicated (a triu causal mask)."""
    def masked(params, x):
        y = x @ params["w"]
        mask = torch.triu(torch.ones(y.shape[-1], y.shape[-1], dtype=torch.bool), 1)
        return torch.kthvalue(params["w"], 1, dim=0).values.sum() + y.masked_fill(mask[0], 0.0).sum()

    lowered = _lower(P(), fn=masked)
    assert {c["kind"] for c in lowered.collectives} == {"all_reduce"}


def test_match_first_rule_wins_and_unmatched_replicates():
    params = {"a": {"wq": torch.ones(2, 2)}, "b": torch.ones(2)}
    specs = match(params, [(r"wq$", P(None, "tp")), (r".*", P("dp"))])
    assert specs == {"a": {"wq": P(None, "tp")}, "b": P("dp")}
    assert match(params, []) == {"a": {"wq": P()}, "b": P()}


def test_mesh_size_must_equal_world_size():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            with pytest.raises(MeshError, match=r"has 4 devices but the world size is 1"):
                Mesh({"dp": 2, "tp": 2})
        finally:
            dist.destroy_process_group()


def test_mesh_needs_a_process_group():
    with pytest.raises(MeshError, match=r"needs torch.distributed initialised"):
        Mesh({"dp": 2})


def _bad_spec_on_rank(rank, world):
    mesh = Mesh({"dp": world})
    jit(_loss, mesh=mesh, in_specs=({"w": P("xx")}, P("dp")), out_specs=P()).lower({"w": torch.ones(3, 4)},
                                                                                  torch.ones(2, 3))


@pytest.mark.slow
def test_every_rank_reports_the_error_without_hanging():
    with pytest.raises(RankError) as info:
        spawn(_bad_spec_on_rank, 2, timeout_s=60)
    assert sorted(info.value.errors) == [0, 1]
    assert all(kind == "SpecError" and "'xx'" in message for kind, message, _ in info.value.errors.values())


def test_data_dependent_python_names_the_user_line_and_the_traceable_way():
    def reads_values(params, x):
        classes = torch.nn.functional.one_hot((x @ params["w"]).long())  # DATA-LINE
        return classes.sum().to(x.dtype)

    with pytest.raises(TraceError, match=r"test_errors\.py:\d+ in reads_values.*DATA-LINE.*num_classes"):
        _lower(P(), fn=reads_values)


def test_one_hot_with_a_class_count_traces():
    def counts(params, x):
        return torch.nn.functional.one_hot((x @ params["w"]).long().clamp(0, 3), num_classes=4).sum().to(x.dtype)

    assert _lower(P(), fn=counts).collectives
