"""What each rank does: build every runner, warm up, measure memory and traffic, time the steps.

Memory and traffic are measured in their own steps (the dispatch modes slow a step down), then
steps are timed with no mode active. Timing is interleaved, round by round, so load that comes
and goes on a shared machine hits every contender alike. Each timed step starts after a
barrier; a step's time is the slowest rank's, and the median over steps is reported.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from .runners import TORCH_CONTENDERS, Problem, make_runner
from .traffic import CollectiveCounter, LocalMemoryTracker


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(runner, device: torch.device) -> int:
    """Peak bytes live on this rank during one step, counting everything alive before it."""
    tracker = LocalMemoryTracker(device)
    with tracker:
        tracker.track(runner.live())
        loss = runner.step(runner.steps_done, eager=True)
        _sync(device)
    runner.losses.append(loss)
    runner.steps_done += 1
    return tracker.peak_bytes


def _traffic(runner, device: torch.device) -> tuple[dict, dict]:
    with CollectiveCounter() as counter:
        loss = runner.step(runner.steps_done, eager=True)
        _sync(device)
    runner.losses.append(loss)
    runner.steps_done += 1
    return dict(counter.bytes_by_kind), dict(counter.count_by_kind)


def _timeline(runner, device: torch.device) -> dict:
    """Ours: one step's collectives on this rank (issue, wait, ready; `sharding.comm_timeline`)."""
    dist.barrier()
    _sync(device)
    loss, found = runner.timeline_step(runner.steps_done)
    runner.losses.append(loss)
    runner.steps_done += 1
    return found


def _timed_steps(runner, count: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(count):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        runner.losses.append(runner.step(runner.steps_done))
        _sync(device)
        times.append(time.perf_counter() - start)
        runner.steps_done += 1
    return times


def collective_latency_ms(device: torch.device, repeats: int = 20) -> float:
    """Median time of one synchronous 4-byte all-reduce over all ranks: the price of a collective here."""
    one = torch.ones(1, device=device)
    times = []
    for _ in range(repeats):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        dist.all_reduce(one)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_rank(rank: int, world: int, cfg: dict) -> dict:
    """Every contender on this rank: per-contender numbers (timings already max over ranks) and the
    latency of one collective, measured in the same run."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device("cpu")
    if cfg["device"] == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    problem = Problem.make(cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["seq_len"], cfg["vocab_size"],
                           cfg["batch_per_rank"] * world, cfg["lr"], device)
    runners = []
    for name in cfg["contenders"]:
        runner = make_runner(name, problem, compile_graph=cfg["compile"] and name not in TORCH_CONTENDERS,
                             bucket_bytes=cfg.get("bucket_bytes"), bucket_per_layer=cfg.get("bucket_per_layer", False))
        runner.losses, runner.steps_done = [], 0
        runners.append(runner)
    results = {runner.name: {"kind": runner.kind, "mesh": runner.mesh_shape, "setup_s": runner.setup_s,
                             "planned": runner.planned()} for runner in runners}
    for runner in runners:
        _timed_steps(runner, cfg["warmup_steps"], device)
    for runner in runners:
        results[runner.name]["peak_bytes"] = _memory(runner, device)
        measured_bytes, counts = _traffic(runner, device)
        results[runner.name]["measured_bytes_by_kind"] = measured_bytes
        results[runner.name]["count_by_kind"] = counts
        if runner.kind == "ours":
            results[runner.name]["timeline"] = _timeline(runner, device)
    times = {runner.name: [] for runner in runners}
    for _ in range(cfg["rounds"]):
        for runner in runners:
            _timed_steps(runner, 1, device)  # re-warm after the other contenders ran (not timed)
            times[runner.name] += _timed_steps(runner, cfg["steps_per_round"], device)
    latency = collective_latency_ms(device)
    for runner in runners:
        slowest = torch.tensor(times[runner.name], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        step_s = slowest.tolist()
        results[runner.name].update(
            step_ms_median=1e3 * statistics.median(step_s), step_ms_min=1e3 * min(step_s),
            step_ms=[round(1e3 * t, 3) for t in step_s],
            losses=[runner.global_loss(loss) for loss in runner.losses])
    return {"contenders": results, "collective_latency_ms": latency}
