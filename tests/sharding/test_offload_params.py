"""Parameter offload (`offload="params"`, ZeRO-Infinity's parameter tier): parameters and optimizer
state live on host. Each parameter comes up (h2d) once per window of use: its forward, and again
for the backward when the backward reads it (the rule of ZeRO-3's re-gather). Its gradient goes
down (d2h) as soon as it is computed, and the update runs on host.

Abstract lowerings of the tiny GPT check the transfers, the placement and the memory. One spawn of
4 gloo ranks checks, with parameters and state on host and then on disk (`sharding.disk`),
equivalence with the single-process reference (float64, 1e-9) and that the predicted device (and
disk) peak equals the measured one.
"""
from __future__ import annotations

from collections import Counter

import pytest

from functional_parallel.launch import spawn
from functional_parallel.parallel import example_mesh, lower_abstract
from functional_parallel.planner import saved_across_backward
from functional_parallel.tree import leaf_paths, tree_leaves
from sharding import unshard
from sharding.copies import issue_copy, wait_copy
from sharding.disk import is_on_disk, to_disk
from sharding.memory import MemoryTracker
from sharding.memory_kinds import HOST, KIND_META, TRANSFER_META
from sharding.placement import on_host
from sharding.schedule.chain import positions
from sharding.schedule.regather import use_windows

from .equivalence import assert_run_matches, compile_strategy, reference
from .lowered import lower
from .test_schedule_regather import NOT_REGATHERED

PARAM_KINDS = {"in_memory_kinds": ("host", "host", "device"), "out_memory_kinds": ("host", "host", "device")}
RUNS = 3  # measured: the least of 3 runs, as tests/sharding/test_offload.py


def _fetches(lowered) -> list:
    return [n for n in lowered.graph.graph.nodes
            if n.meta.get(TRANSFER_META, {}).get("kind") == "h2d" and n.args[0].op == "placeholder"]


def _param_of(fetch, params) -> str:
    placeholders = [n for n in fetch.graph.nodes if n.op == "placeholder"]
    return leaf_paths(params)[placeholders.index(fetch.args[0])]


@pytest.mark.parametrize("strategy", ["dp", "tp_sp"])
def test_each_parameter_comes_up_per_window_and_its_gradient_goes_down(strategy):
    """Forward: every parameter once. Backward: again exactly those ZeRO-3 gathers again (the
    same rule over a different transfer). Down: one gradient per parameter, nothing else."""
    _, params, lowered = lower(strategy, offload="params")
    fetches = _fetches(lowered)
    first = [f for f in fetches if not f.meta[TRANSFER_META].get("refetch")]
    again = [f for f in fetches if f.meta[TRANSFER_META].get("refetch")]
    paths = leaf_paths(params)
    assert sorted(_param_of(f, params) for f in first) == sorted(paths)
    assert {_param_of(f, params) for f in again} == {p for p in paths if p.split("/")[-1] not in NOT_REGATHERED}
    assert all(f.meta[TRANSFER_META]["phase"] == "backward" for f in again)
    downs = [r for r in lowered.transfers if r["kind"] == "d2h"]
    _, _, optimizer_only = lower(strategy, offload="optimizer")
    # The same gradient goes down as with optimizer offload: placement chooses the same cut for it.
    assert Counter(r["shape"] for r in downs) == Counter(r["shape"] for r in optimizer_only.transfers
                                                         if r["kind"] == "d2h")
    assert len(first) == len(paths)
    assert lowered.collectives == lower(strategy)[2].collectives  # offload changes no collective


def _wait(issue):
    return next(user for user in issue.users if user.target is wait_copy)


@pytest.mark.parametrize("strategy", ["dp", "zero3", "tp_sp"])
def test_no_parameter_copy_outlives_its_window(strategy):
    """Between two uses of one fetched copy, no other fetched parameter is used. Copies of one
    direction run one at a time: each is waited on before the next is issued, and just before its
    first use or just before that next issue. A fetch is issued when the previous fetch is waited
    on (one in flight), and a gradient starts going down right after the node that computes it."""
    _, _, lowered = lower(strategy, offload="params")
    graph = lowered.graph.graph
    order = positions(graph)
    waits = [_wait(fetch) for fetch in _fetches(lowered)]
    assert all(len(groups) == 1 for groups in use_windows(waits, order).values())

    def next_compute(node, step=lambda n: n.next):  # the first node after (or before) `node` not part of a copy
        node = step(node)
        while node.target in (issue_copy, wait_copy):
            node = step(node)
        return node

    for kind in ("h2d", "d2h"):
        issues = sorted((n for n in graph.nodes if n.meta.get(TRANSFER_META, {}).get("kind") == kind),
                        key=order.__getitem__)
        for index, issue in enumerate(issues):
            wait = _wait(issue)
            first_use = min(wait.users, key=order.__getitem__)
            following = issues[index + 1] if index + 1 < len(issues) else None
            assert following is None or order[wait] < order[following], (wait, following)  # one in flight
            assert next_compute(wait) is first_use or (following is not None and wait.next is following), wait
            if kind == "d2h" and issue.args[0].op != "placeholder":  # right after its value (and maybe a wait)
                assert next_compute(issue, step=lambda n: n.prev) is issue.args[0], issue
    by_first_use = sorted(_fetches(lowered), key=lambda fetch: order[min(_wait(fetch).users, key=order.__getitem__)])
    for previous, fetch in zip(by_first_use, by_first_use[1:]):
        assert fetch.prev is _wait(previous), fetch


@pytest.mark.parametrize("strategy", ["zero3", "tp_sp"])
def test_device_holds_at_most_one_layer_above_the_activations(strategy):
    """ZeRO-Infinity's promise: with the parameters on host the device peak is the activations
    (as without offload) plus at most one layer's parameters. Per-parameter collectives
    (`bucket_bytes=0`): a bucket's size, not offload, would otherwise decide how much is gathered
    at once. (dp also holds gradients waiting for their all-reduce at the peak, docs/offload.md.)"""
    mesh = example_mesh(strategy)
    _, params, none = lower_abstract("gpt", "tiny", strategy, mesh, global_batch=8, bucket_bytes=0)
    _, _, offloaded = lower_abstract("gpt", "tiny", strategy, mesh, global_batch=8, bucket_bytes=0, offload="params")
    activations, _ = saved_across_backward(none, tuple(mesh.values()), data_placeholders=2)
    layer = sum(x.numel() * x.element_size() for x in tree_leaves(params["blocks"][0]))  # unsharded
    assert activations < offloaded.cost["device_peak_bytes"] <= activations + layer


@pytest.mark.parametrize("strategy", ["dp", "zero3", "tp_sp"])
def test_the_model_computes_on_device_and_the_update_on_host(strategy):
    _, params, lowered = lower(strategy, offload="params")
    nodes = list(lowered.graph.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    assert all(n.meta[KIND_META] == HOST for n in placeholders[:len(leaf_paths(params))])
    host_ops = [n for n in nodes if n.target is on_host]
    assert host_ops and all("functional_parallel/optim.py" in n.meta.get("stack_trace", "") for n in host_ops)
    outputs = next(n for n in nodes if n.op == "output").args[0]
    assert all(out.meta[KIND_META] == HOST for out in outputs[:len(placeholders[:len(leaf_paths(params))])])


@pytest.mark.parametrize("strategy", ["dp", "zero3", "tp_sp"])
def test_device_peak_drops_below_optimizer_offload(strategy):
    """With the parameters on host the device holds only the copies of the layers computing now:
    the device peak drops below optimizer offload's, host memory rises by the parameters."""
    _, params, lowered = lower(strategy, offload="params")
    _, _, optimizer_only = lower(strategy, offload="optimizer")
    param_bytes = sum(f.meta[TRANSFER_META]["bytes"] for f in _fetches(lowered)  # this rank's parameters
                      if not f.meta[TRANSFER_META].get("refetch"))
    assert lowered.cost["device_peak_bytes"] < optimizer_only.cost["device_peak_bytes"]
    assert lowered.cost["host_bytes"] >= optimizer_only.cost["host_bytes"] + param_bytes
    if strategy != "zero3":  # zero3's shard comes up once for its forward and backward gathers (one bucket)
        assert optimizer_only.cost["device_peak_bytes"] - lowered.cost["device_peak_bytes"] >= param_bytes // 2


def _runs(rank, world, disk_dir):
    """dp and zero3 with parameters and state on host, then in files: 3 steps, and the peaks of a step."""
    results = {}
    for tier in ("host", "disk"):
        kinds = {key: (tier, tier, "device") for key in PARAM_KINDS}
        for name in ("dp", "zero3"):
            compiled, local = compile_strategy("gpt", name, **kinds, **({"disk_dir": disk_dir} if tier == "disk"
                                                                        else {}))
            if tier == "disk":
                local = (to_disk(local[0], disk_dir), to_disk(local[1], disk_dir), local[2])
            mesh, pspecs = compiled.mesh, compiled.in_specs[0]
            lowered = compiled.lower(*local)
            measured = []
            for _ in range(RUNS):
                with MemoryTracker() as mem:
                    mem.track(local[2])
                    mem.track((local[0], local[1]), kind=tier)
                    out = lowered.run(*local)
                del out
                measured.append((mem.device_peak_bytes, mem.peak_by_kind["disk"]))
            losses, grads, (params, state) = [], None, local[:2]
            for _ in range(3):
                params, state, metrics = lowered.run(params, state, local[2])
                losses.append(metrics["loss"])
                grads = grads or unshard(metrics["grads"], pspecs, mesh)
            results[name, tier] = {
                "losses": losses, "grads": grads, "params": unshard(params, pspecs, mesh),
                "predicted": (lowered.cost["device_peak_bytes"], lowered.cost["disk_bytes"]), "measured": measured,
                "where": all(x.device.type == "cpu" and is_on_disk(x) == (tier == "disk")
                             for x in tree_leaves((params, state)) if x.numel())}
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn(_runs, 4, str(tmp_path_factory.mktemp("disk_offload")), timeout_s=300)


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["host", "disk"])
@pytest.mark.parametrize("strategy", ["dp", "zero3"])
def test_parameter_offload_equals_the_reference(runs, strategy, tier):
    expected = reference("gpt")
    for results in runs:
        got = results[strategy, tier]
        assert got["where"]  # still on host, or still in files, after 3 steps
        assert_run_matches(got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["host", "disk"])
@pytest.mark.parametrize("strategy", ["dp", "zero3"])
def test_parameter_offload_predicted_peaks_match_measured(runs, strategy, tier):
    """The device peak and (disk) the peak of file-backed bytes, predicted == measured on every rank."""
    for rank, results in enumerate(runs):
        got = results[strategy, tier]
        assert got["predicted"] in got["measured"], (strategy, tier, rank, got["predicted"], got["measured"])
