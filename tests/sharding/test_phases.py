"""The collective log says what a collective is for: its phase, the parameter (or the gradient of
one) it moves, and for the backward the forward line it differentiates, not `torch.func.grad`'s call."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from sharding import Mesh, P, jit, shard

MESH = Mesh.abstract({"dp": 2})


def _loss(params, x):
    h = F.layer_norm(x @ params["w1"], (8,), params["ln_w"], params["ln_b"])  # LINE:ln
    return (h @ params["w2"]).pow(2).mean()                                    # LINE:w2


def _step(params, x):
    grads = torch.func.grad(_loss)(params, x)                                   # LINE:grad
    norm = sum(g.pow(2).sum() for g in grads.values()).sqrt()                   # LINE:norm
    return {k: p - 0.1 * grads[k] / norm for k, p in params.items()}


def _line(tag: str) -> int:
    lines = open(__file__).read().splitlines()
    return next(i + 1 for i, line in enumerate(lines) if line.rstrip().endswith(f"# LINE:{tag}"))


def _lowered(bucket_bytes: int = 0):
    g = torch.Generator().manual_seed(0)
    params = {"w1": torch.randn(4, 8, generator=g), "ln_w": torch.randn(8, generator=g),
              "ln_b": torch.randn(8, generator=g), "w2": torch.randn(8, 4, generator=g)}
    x = torch.randn(6, 4, generator=g)
    specs = {"w1": P("dp"), "ln_w": P("dp"), "ln_b": P("dp"), "w2": P("dp")}  # ZeRO-3: every leaf split
    step = jit(_step, mesh=MESH, in_specs=(specs, P("dp")), out_specs=specs, data_argnums=(1,),
               bucket_bytes=bucket_bytes)
    return step.lower(shard(params, specs, MESH), shard(x, P("dp"), MESH))


def test_each_collective_has_its_phase_leaf_and_forward_line():
    records = _lowered().collectives
    gathers = [r for r in records if r["kind"] == "all_gather"]
    assert sorted(r["leaf"] for r in gathers if r["phase"] == "forward") == [
        "params/ln_b", "params/ln_w", "params/w1", "params/w2"]
    again = [r for r in gathers if r["phase"] == "backward"]  # ZeRO-3's re-gathers for the backward
    assert again and all(r["regather"] and r["leaf"].startswith("params/") for r in again)
    scatters = [r for r in records if r["kind"] == "reduce_scatter"]
    assert sorted(r["leaf"] for r in scatters) == [
        "grad of params/ln_b", "grad of params/ln_w", "grad of params/w1", "grad of params/w2"]
    assert {r["phase"] for r in scatters} == {"backward"}
    # Layer norm's weight and bias gradients come from one backward op; each is named for its own leaf.
    by_leaf = {r["leaf"]: r for r in scatters}
    assert f"test_phases.py:{_line('ln')}" in by_leaf["grad of params/ln_w"]["source"]
    assert f"test_phases.py:{_line('w2')}" in by_leaf["grad of params/w2"]["source"]
    assert not any(f"test_phases.py:{_line('grad')}" in r["source"] for r in records), \
        [r["source"] for r in records]
    optimizer = [r for r in records if r["phase"] == "optimizer"]
    assert optimizer and all(f"test_phases.py:{_line('norm')}" in r["source"] for r in optimizer)


def test_sources_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.chdir(os.path.dirname(os.path.dirname(here)))  # the repository root
    sources = [r["source"] for r in _lowered().collectives]
    assert all(s.startswith("tests/sharding/test_phases.py:") for s in sources if "test_phases" in s), sources
    monkeypatch.chdir(tmp_path)  # outside: absolute, as before
    assert any(s.startswith(here) for s in (r["source"] for r in _lowered().collectives))


def test_summary_names_bucket_members_and_verbose_lists_each():
    lowered = _lowered(bucket_bytes=2**20)
    short, full = lowered.summary(), lowered.summary(verbose=True)
    scatter = next(line for line in short.splitlines() if "reduce_scatter" in line)
    assert scatter.split()[0] == "backward" and "bucket of 4: grad of params/" in scatter, short
    assert "... 1 more" in scatter
    for leaf in ("w1", "w2", "ln_w", "ln_b"):  # each member on its own line, with its forward line
        assert sum(f"grad of params/{leaf} at " in line and "test_phases.py:" in line
                   for line in full.splitlines()) == 1, full
    assert len(full.splitlines()) > len(short.splitlines())


def test_a_step_counter_does_not_make_the_optimizer_state_data():
    """AdamW's 0-dim int step count is not data: with the default `data_argnums` the tp-split
    weights stay split (no tp gather of a parameter; only the batch is data)."""
    from functional_parallel import optim
    from functional_parallel.models import build
    from functional_parallel.train import make_train_step
    from sharding import match

    model = build("gpt", "tiny")
    params = model.init(0)
    optimizer = optim.adamw(1e-2)
    state = optimizer.init(params)
    tokens = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(0))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    mesh = Mesh.abstract({"dp": 2, "tp": 2})
    rules = [(r"w[qkv]$|w_in$", P(None, "tp")), (r"wo$|w_out$", P("tp", None)), (r"b_in$", P("tp"))]
    pspecs, sspecs = match(params, rules), match(state, rules)
    step = jit(make_train_step(model.loss, optimizer), mesh=mesh, in_specs=(pspecs, sspecs, P("dp")),
               out_specs=(pspecs, sspecs, P()), logical_rules={"batch": "dp"}, bucket_bytes=0)
    lowered = step.lower(shard(params, pspecs, mesh), shard(state, sspecs, mesh), shard(batch, P("dp"), mesh))
    assert [r for r in lowered.collectives if r["kind"] == "all_gather"] == []
    assert {r["kind"] for r in lowered.collectives if r["axes"] == ("tp",)} == {"all_reduce"}  # Megatron's
    assert not any("train.py" in r["source"] for r in lowered.collectives)  # each at its model line


def test_cost_splits_the_bytes_by_phase():
    """Per phase, a bucket's bytes counted by each member's own phase."""
    records = _lowered().collectives  # one collective per value
    for lowered in (_lowered(), _lowered(bucket_bytes=2**20)):
        cost = lowered.cost
        assert set(cost["bytes_by_phase"]) == {"forward", "backward", "optimizer"}
        assert sum(cost["bytes_by_phase"].values()) == cost["bytes_moved"]
        for phase in ("forward", "backward", "optimizer"):
            assert cost["bytes_by_phase"][phase] == sum(r["bytes"] for r in records if r["phase"] == phase) > 0


def _projections(params, x):
    return torch.tanh(x @ params["w1"]).sum()                                   # LINE:proj


def test_a_projection_of_batch_and_sequence_tokens_names_its_weight():
    """`x @ w` with x [b, s, d] stays one op (`fp::leading_matmul`, an autograd.Function); its
    weight gradient is still named for the weight and the forward line."""
    params = {"w1": torch.randn(4, 8, dtype=torch.float64)}
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    step = jit(torch.func.grad(_projections), mesh=MESH, in_specs=({"w1": P()}, P("dp")),
               out_specs={"w1": P()}, data_argnums=(1,), bucket_bytes=0)
    (record,) = step.lower(shard(params, {"w1": P()}, MESH), shard(x, P("dp"), MESH)).collectives
    assert record["leaf"] == "grad of params/w1" and record["phase"] == "backward"
    assert f"test_phases.py:{_line('proj')}" in record["source"]
