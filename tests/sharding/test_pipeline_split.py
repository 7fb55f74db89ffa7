"""The pipeline split (sharding.pipelining) alone and on the tiny models, lowered on abstract meshes."""
from __future__ import annotations

import pytest
import torch

from sharding import Mesh, P, Pipeline, jit, microbatch, shard
from sharding.errors import SpecError
from sharding.schedules import Action, Schedule, ScheduleError
from sharding.tree import flat_specs, leaf_paths

from .pipeline_problem import compile_pipeline

MICROBATCHES = 2


def _mlp_step(ws, x):
    """Four tanh layers; gradients accumulated over two micro-batches; one SGD update."""
    def loss(ws, rows):
        h = rows
        for w in ws:
            h = torch.tanh(h @ w)
        return (h ** 2).mean()

    grads, total = None, None
    for index in range(MICROBATCHES):
        with microbatch(index):
            g, value = torch.func.grad_and_value(loss)(ws, x.reshape(-1, MICROBATCHES, x.shape[-1])[:, index])
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            total = value if total is None else total + value
    return [w - 0.1 * g for w, g in zip(ws, grads)], total / MICROBATCHES


def _lowered_mlp(rank: int, schedule: str = "1f1b"):
    mesh = Mesh.abstract({"pp": 2}, rank=rank)
    specs = [P(stage=("pp", i // 2)) for i in range(4)]  # layers 0, 1 on stage 0; 2, 3 on stage 1
    ws = [torch.randn(4, 4, dtype=torch.float64) for _ in range(4)]
    x = torch.randn(8, 4, dtype=torch.float64)
    compiled = jit(_mlp_step, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()),
                   pipeline=Pipeline("pp", schedule))
    return compiled.lower(shard(ws, specs, mesh), x)


def _matmul_weights(lowered) -> set[str]:
    """The input leaves the forward matmuls of a rank's program read."""
    nodes = list(lowered.graph.graph.nodes)
    return {a.meta["leaf"] for n in nodes if n.target is torch.ops.aten.mm.default
            for a in n.args if getattr(a, "op", None) == "placeholder"}


def test_each_rank_runs_its_own_stage_and_sends_the_boundary_value():
    first, last = _lowered_mlp(0), _lowered_mlp(1)
    assert _matmul_weights(first) == {"ws/0", "ws/1"}
    assert _matmul_weights(last) == {"ws/2", "ws/3"}
    sent_forward = [r for r in first.collectives if r["kind"] == "p2p" and r["phase"] == "forward"]
    sent_backward = [r for r in last.collectives if r["kind"] == "p2p" and r["phase"] == "backward"]
    # one [4, 4] float64 activation forward and its gradient back, per micro-batch
    assert [r["bytes"] for r in sent_forward] == [128] * MICROBATCHES
    assert [r["bytes"] for r in sent_backward] == [128] * MICROBATCHES


def test_a_rank_returns_meta_tensors_for_the_other_stage_and_values_without_a_stage_everywhere():
    mesh = Mesh.abstract({"pp": 2}, rank=0)
    specs = [P(stage=("pp", i // 2)) for i in range(4)]
    ws = [torch.randn(4, 4, dtype=torch.float64) for _ in range(4)]
    compiled = jit(_mlp_step, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()), pipeline=Pipeline("pp"))
    output = next(n for n in compiled.lower(shard(ws, specs, mesh), torch.randn(8, 4, dtype=torch.float64))
                  .graph.graph.nodes if n.op == "output")
    kinds = [getattr(arg.target, "__name__", str(arg.target)) for arg in output.args[0]]
    assert kinds[2:4] == ["absent", "absent"]  # stage 1's new weights: meta tensors here
    assert kinds[4] == "recv"  # the loss, made on the last stage, comes to every rank
    assert shard(ws, specs, mesh)[3].device.type == "meta"


def test_schedules_order_the_first_stage_as_they_say():
    """GPipe runs both forwards before any backward; 1F1B on 2 stages with 2 micro-batches too (its
    warm-up is one forward); the program order of the first stage's matmuls shows it."""
    for schedule in ("gpipe", "1f1b"):
        nodes = list(_lowered_mlp(0, schedule).graph.graph.nodes)
        phases = [n.meta.get("phase") for n in nodes if n.target is torch.ops.aten.mm.default]
        first_backward = phases.index("backward")
        assert "forward" not in phases[first_backward:], schedule


def test_only_the_residual_stream_crosses_a_stage_boundary():
    """Llama's RMS norm reads no parameter until its last multiply; the minimum cut runs it on the
    next stage, so one [b, s, d] activation crosses per micro-batch each way (not two)."""
    first = compile_pipeline("llama", "pp", Mesh.abstract({"dp": 1, "pp": 2}, rank=0), "1f1b", 2)
    last = compile_pipeline("llama", "pp", Mesh.abstract({"dp": 1, "pp": 2}, rank=1), "1f1b", 2)
    activation = 4 * 16 * 32 * 8  # rows per micro-batch x seq x d_model x float64
    for (compiled, local, _), phase in ((first, "forward"), (last, "backward")):
        sent = [r["bytes"] for r in compiled.lower(*local).collectives if r["kind"] == "p2p" and r["phase"] == phase]
        assert sent == [activation] * 2, phase


def _stage_leaves(params, pspecs, stage: int) -> dict:
    """{path: bytes} of the parameters on `stage`."""
    paths, leaves, _ = leaf_paths(params)
    return {path: x.numel() * x.element_size() for path, x, spec in zip(paths, leaves, flat_specs(pspecs, params))
            if spec.stage.index == stage}


@pytest.mark.parametrize("microbatches", [2, 4])
def test_zero3_under_a_pipeline_gathers_a_stage_twice_and_scatters_once_per_step(microbatches):
    """Forward: the stage's parameters gathered once (Psi_stage bytes); backward: once more, only the
    leaves the backward reads (an embedding's gradient needs no table, a bias added after a matmul
    no bias); gradients reduce-scattered once (Psi_stage): the same for 2 and 4 micro-batches."""
    from .pipeline_problem import make_problem

    compiled, local, pspecs = compile_pipeline("gpt", "zero3_pp", Mesh.abstract({"dp": 2, "pp": 2}), "1f1b",
                                               microbatches)
    _, _, params, _, _ = make_problem("gpt", microbatches)
    records = [r for r in compiled.lower(*local).collectives if r["kind"] != "p2p"]
    stage = _stage_leaves(params, pspecs, 0)
    stage_bytes = sum(stage.values())
    gathered = {phase: sum(r["bytes"] for r in records if r["kind"] == "all_gather" and r["phase"] == phase)
                for phase in ("forward", "backward")}
    assert gathered["forward"] == stage_bytes
    backward = {m["leaf"] for r in records if r["kind"] == "all_gather" and r["phase"] == "backward"
                for m in r["members"]}
    unread = {"wte", "wpe", "blocks/0/mlp/b_in", "blocks/0/mlp/b_out"}  # their gradients read no weight
    assert backward == {f"params/{path}" for path in stage} - {f"params/{path}" for path in unread}
    assert gathered["backward"] == stage_bytes - sum(stage[path] for path in unread)
    assert sum(r["bytes"] for r in records if r["kind"] == "reduce_scatter") == stage_bytes
    assert sum(1 for r in records if r["kind"] == "reduce_scatter") == 1  # one bucket, once per step


def _first_stage_peak(schedule: str, microbatches: int) -> int:
    compiled, local, _ = compile_pipeline("gpt", "pp", Mesh.abstract({"dp": 1, "pp": 2}), schedule, microbatches)
    return compiled.lower(*local).cost["peak_bytes"]


@pytest.mark.slow
def test_one_f_one_b_keeps_p_micro_batches_alive_on_the_first_stage_and_gpipe_m():
    """Micro-batches of a fixed size: from 4 to 8 of them GPipe's first-stage peak grows by 4
    micro-batches' activations; 1F1B's (p = 2 in flight) only by what the step holds for every
    micro-batch anyway: its rows of the batch and the boundary activation it sent (held until the
    sends are waited on, at the step's end)."""
    rows = 4 * 16 * 8  # a micro-batch's token ids (int64), inputs and targets
    sent = 4 * 16 * 32 * 8
    grown = {s: _first_stage_peak(s, 8) - _first_stage_peak(s, 4) for s in ("gpipe", "1f1b", "zb_h1")}
    assert grown["1f1b"] == 4 * (2 * rows + sent)
    assert grown["zb_h1"] == grown["1f1b"]
    assert grown["gpipe"] > grown["1f1b"] + 4 * 100_000  # each micro-batch keeps ~0.27 MB of activations


def test_bad_pipeline_input_is_a_clear_error_before_anything_runs():
    ws = [torch.randn(4, 4) for _ in range(4)]
    mesh = Mesh.abstract({"dp": 2, "pp": 2})
    staged = [P(stage=("pp", 0))] * 4
    with pytest.raises(SpecError, match="not given a pipeline"):
        jit(_mlp_step, mesh=mesh, in_specs=(staged, P()), out_specs=(staged, P())).lower(ws, torch.randn(8, 4))
    with pytest.raises(SpecError, match="the pipeline axis"):
        split = [P("pp")] * 4
        jit(_mlp_step, mesh=mesh, in_specs=(split, P()), out_specs=(split, P()),
            pipeline=Pipeline("pp")).lower(ws, torch.randn(8, 4))
    with pytest.raises(SpecError, match="not stages of the pipeline"):
        far = [P(stage=("pp", 5))] * 4
        jit(_mlp_step, mesh=mesh, in_specs=(far, P()), out_specs=(far, P()),
            pipeline=Pipeline("pp")).lower(ws, torch.randn(8, 4))
    with pytest.raises(SpecError, match="not a mesh axis"):
        jit(_mlp_step, mesh=mesh, in_specs=(staged, P()), out_specs=(staged, P()), pipeline=Pipeline("stages"))
    with pytest.raises(SpecError, match="is not one of"):
        Pipeline("pp", "round_robin")
    with pytest.raises(SpecError, match="interleaved_1f1b"):
        Pipeline("pp", "1f1b", virtual=2)


def test_a_hand_written_schedule_that_deadlocks_fails_when_the_pipeline_is_made():
    """Rank 1 waits for rank 0's gradient of micro-batch 0 before running its own forward of it."""
    actions = ((Action("F", 0), Action("B", 0)), (Action("B", 0), Action("F", 0)))
    with pytest.raises(ScheduleError, match="B0"):
        Pipeline("pp", Schedule("mine", stages=2, microbatches=1, virtual=1, actions=actions))


def test_more_stages_than_layers_is_an_error_naming_both():
    from functional_parallel.parallel import Strategy, param_specs

    from .pipeline_problem import make_problem

    _, _, params, _, _ = make_problem("gpt", 2)
    with pytest.raises(ValueError, match="over 4 stages, but it has 2 layers"):
        param_specs(Strategy.load("pp"), params, None, stages=4)


def test_a_spec_with_a_stage_equals_only_the_same_spec_on_the_same_stage():
    import pickle

    staged = P(None, "tp", stage=("pp", 1))
    assert staged == P(None, "tp", stage=("pp", 1)) and staged != P(None, "tp") and staged != P(None, "tp", stage=("pp", 0))
    assert P("dp") == ("dp",) and P() != None and P("dp") != 3  # noqa: E711 (the comparison is the point)
    assert pickle.loads(pickle.dumps(staged)) == staged and hash(staged) == hash(P(None, "tp", stage=("pp", 1)))
    assert repr(staged) == "P(None, 'tp', stage=Stage(axis='pp', index=1))"
