"""ZeRO-3 re-gathers a parameter for its backward use instead of keeping the forward's copy alive."""
from __future__ import annotations

import pytest
import torch

from functional_parallel import optim
from functional_parallel.parallel import example_mesh, Strategy, compile_step
from functional_parallel.precision import Precision, init_state
from functional_parallel.train import make_train_step
from functional_parallel.tree import leaf_paths
from sharding import Mesh, shard
from sharding.schedule.chain import chains, is_parameter_gather, positions
from sharding.schedule.regather import use_windows

from .lowered import lower

# Parameters whose gathered value the backward never reads: an embedding's backward scatters
# into zeros, a bias's gradient is a sum of the output gradient, and the output head's
# backward follows its forward at once (its copy is kept, not gathered twice).
NOT_REGATHERED = {"wte", "wpe", "head", "b_in", "b_out"}


def _lower(strategy, **options):
    return lower(strategy, **options)


def _param_path(chain, params):
    placeholders = [n for n in chain.issue.graph.nodes if n.op == "placeholder"]
    return leaf_paths(params)[placeholders.index(chain.source)]


@pytest.mark.parametrize("strategy", ["zero3", "fsdp_tp"])
def test_backward_uses_get_a_fresh_gather(strategy):
    _, params, lowered = _lower(strategy, bucket_bytes=0)
    gathers = [c for c in chains(lowered.graph.graph) if is_parameter_gather(c)]
    first = [c for c in gathers if not c.record.get("regather")]
    again = [c for c in gathers if c.record.get("regather")]
    assert sorted(_param_path(c, params) for c in first) == sorted(leaf_paths(params))
    regathered = {_param_path(c, params) for c in again}
    expected = {p for p in leaf_paths(params) if p.split("/")[-1] not in NOT_REGATHERED}
    assert regathered == expected and len(again) == len(expected)


def test_no_gathered_copy_outlives_its_window():
    """After the pass, between two uses of a gathered parameter no other gathered parameter is used."""
    _, _, lowered = _lower("zero3", bucket_bytes=0, overlap=False)
    graph = lowered.graph.graph
    gathers = [c for c in chains(graph) if is_parameter_gather(c)]
    assert all(len(groups) == 1 for groups in use_windows([c.result for c in gathers], positions(graph)).values())


def test_regather_lowers_the_peak_and_adds_only_gathers():
    _, _, kept = _lower("zero3", regather=False, bucket_bytes=0, overlap=False)
    _, _, again = _lower("zero3", bucket_bytes=0, overlap=False)
    assert again.cost["peak_bytes"] < kept.cost["peak_bytes"]
    added = again.cost["bytes_by_kind"]["all_gather"] - kept.cost["bytes_by_kind"]["all_gather"]
    assert added == sum(c["bytes"] for c in again.collectives if c.get("regather"))
    assert {k: v for k, v in again.cost["bytes_by_kind"].items() if k != "all_gather"} == \
        {k: v for k, v in kept.cost["bytes_by_kind"].items() if k != "all_gather"}


def test_compute_dtype_copies_are_regathered_too():
    """Mixed precision casts the local shard to bf16 before the gather (so it moves 2-byte elements); the
    backward gathers that cast again, as it does the fp32 parameter: same parameters, half the bytes."""
    model, params, fp32 = _lower("zero3", bucket_bytes=0)
    optimizer, policy = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1)), \
        Precision.named("bf16")
    (params, state), mesh = init_state(optimizer, params, policy), Mesh.abstract(example_mesh("zero3"))
    step, (pspecs, sspecs, bspec) = compile_step(make_train_step(model.loss, optimizer, precision=policy),
                                                 Strategy.load("zero3"), mesh, params, state, bucket_bytes=0,
                                                 axes=model.axes(params))
    tokens = torch.zeros(8, model.cfg.seq_len, dtype=torch.long)
    bf16 = step.lower(shard(params, pspecs, mesh), shard(state, sspecs, mesh),
                      shard({"inputs": tokens, "targets": tokens}, bspec, mesh))
    again = {name: [c for c in lowered.collectives if c.get("regather")] for name, lowered in
             (("fp32", fp32), ("bf16", bf16))}
    assert len(again["bf16"]) == len(again["fp32"]) > 0
    assert {c["dtype"] for c in again["bf16"]} == {"bfloat16"}
    assert 2 * sum(c["bytes"] for c in again["bf16"]) == sum(c["bytes"] for c in again["fp32"])
