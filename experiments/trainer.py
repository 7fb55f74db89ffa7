"""One rank's training loop as small steps: `setup` -> (`train_step` -> `log_step`)* -> `finish`.

Every rank runs the same code on its shards of the parameters and optimizer state (the
compiled step inserts the collectives); only rank 0 writes (metrics, TensorBoard, plot,
summary). Checkpoints (resume in `setup`, `save_if_due` after each step) and the non-finite
policy (`apply_nonfinite_policy`) sit between the steps; their mechanics are in `checkpointing`.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from functional_parallel import data
from functional_parallel.parallel import (compile_step, param_logical_axes, param_memory_kind, pipeline_of,
                                         state_memory_kind)
from functional_parallel.precision import init_state
from functional_parallel.train import make_train_step
from functional_parallel.tree import tree_map
from sharding import Lowered, Mesh, P, jit, shard, timeline
from sharding.pipelining import schedule_for
from sharding.cost import collective_counts
from sharding import copies
from sharding.disk import io_bytes
from sharding.memory import MemoryTracker

from .builders import (DTYPES, build_model, build_optimizer, build_precision, build_schedule, mesh_shape,
                       micro_batches, pipeline_options, validate)
from .checkpointing import Checkpointer, NonFiniteGuard, last_step
from .train_state import TrainState, initial_state, kept_where_offloaded
from .metrics import MetricsWriter, bar_fields, new_task, plot_losses, progress_bar, status


@dataclasses.dataclass
class Window:
    """Accumulates the steps between two log lines."""

    loss_sum: float = 0.0
    steps: int = 0
    step_seconds: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass
class Session:
    """Everything one rank needs for the run: built once by `setup`, read by the other steps."""

    cfg: Any
    rank: int
    mesh: Mesh
    device: torch.device
    dataset: data.TextDataset
    seq_len: int
    schedule: Any
    compiled_train: jit
    compiled_eval: jit
    specs: tuple  # (param specs, optimizer-state specs, batch spec)
    lowered: Lowered
    compile_s: float
    state: TrainState
    output_dir: pathlib.Path | None  # rank 0 only
    checkpointer: Checkpointer | None = None  # None: checkpoint_dir unset (no saves, no resume)
    guard: NonFiniteGuard | None = None
    writer: MetricsWriter | None = None
    progress: Any = None
    task: Any = None
    window: Window = dataclasses.field(default_factory=Window)
    step_times: list = dataclasses.field(default_factory=list)
    first_loss: float | None = None
    peak_bytes_measured: int | None = None
    device_peak_bytes_measured: int | None = None
    host_peak_bytes_measured: int | None = None
    disk_peak_bytes_measured: int | None = None
    disk_io_bytes_measured: dict | None = None
    pipeline: Any = None  # the sharding.Pipeline of a pipelined strategy
    timeline: list | None = None  # this rank's measured actions in the timed step (a pipeline's)
    copies: dict | None = None  # this rank's host<->device copies in one step, when each ran (offload)
    started: float = dataclasses.field(default_factory=time.perf_counter)


def local_batch(session: Session, split: str, index: int) -> dict:
    """This rank's shard of global batch `index` of `split` (every rank draws the same global batch)."""
    cfg = session.cfg
    batch = session.dataset.get_batch(split, index, cfg.data.global_batch, session.seq_len, cfg.seed)
    batch = shard(batch, session.specs[2], session.mesh)
    return tree_map(lambda x: x.to(session.device), batch)


def setup(cfg: Any, rank: int, device: torch.device, output_dir: pathlib.Path | None) -> Session:
    """Build model, optimizer and strategy; shard the initial state; lower the step once (its cost)."""
    strategy = validate(cfg, dist.get_world_size())
    torch.manual_seed(cfg.seed)  # torch's generator in the same state on every rank: random ops (dropout) agree
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mesh = Mesh(mesh_shape(cfg.mesh))
    dataset = data.load_dataset(cfg.data.name, cfg.data.val_fraction)
    model = build_model(cfg.model, dataset.vocab_size)
    params = model.init(cfg.seed, DTYPES[cfg.model.dtype])
    schedule = build_schedule(cfg.optim, cfg.steps)
    optimizer = build_optimizer(cfg.optim, schedule)
    precision = build_precision(cfg)
    params, opt_state = init_state(optimizer, params, precision)
    started = time.perf_counter()
    schedule_name, virtual = pipeline_options(cfg)
    step = make_train_step(model.loss, optimizer, micro_batches(cfg, strategy), precision)
    compiled, specs = compile_step(step, strategy, mesh, params, opt_state, offload=cfg.offload,
                                   offload_dir=cfg.offload_dir, axes=param_logical_axes(model, params), remat=cfg.remat,
                                   schedule=schedule_name, virtual=virtual)
    pipeline = pipeline_of(strategy, mesh, schedule_name, virtual)[1]
    compiled_eval = jit(model.eval_loss or model.loss, mesh=mesh, in_specs=(specs[0], specs[2]), out_specs=P(),
                        logical_rules=strategy.constrain_rules, pipeline=pipeline)
    state = initial_state(params, opt_state, specs, mesh, device, cfg.offload)
    checkpointer = Checkpointer(cfg, cfg.checkpoint_dir, specs, mesh, strategy.name, pipeline) \
        if cfg.checkpoint_dir else None
    if cfg.resume:
        state = TrainState(*checkpointer.restore(state.params, state.opt_state))
    state = kept_where_offloaded(state, cfg)
    if pipeline is not None and rank == 0:  # the schedule, before anything runs
        print(describe_schedule(pipeline, mesh.axis_size(pipeline.axis), cfg.pipeline.microbatches), flush=True)
    session = Session(cfg=cfg, rank=rank, mesh=mesh, device=device, dataset=dataset, seq_len=model.cfg.seq_len,
                      pipeline=pipeline,
                      schedule=schedule, compiled_train=compiled, compiled_eval=compiled_eval, specs=specs,
                      lowered=None, compile_s=0.0, state=state, output_dir=output_dir, checkpointer=checkpointer,
                      guard=NonFiniteGuard(cfg, checkpointer.last_good if checkpointer else lambda: ""))
    lowering = f"lowering the train step for {dist.get_world_size()} rank(s) (trace, propagate, partition)"
    with status(lowering, rank == 0 and cfg.progress):
        session.lowered = compiled.lower(state.params, state.opt_state, local_batch(session, "train", 0))
        if cfg.eval_batches:
            compiled_eval.lower(state.params, local_batch(session, "val", 0))  # compiled here, not in the first eval
    session.compile_s = time.perf_counter() - started
    session.window = Window()  # throughput is timed from the first step, not from the compile
    if rank == 0:
        session.writer = MetricsWriter(output_dir)
        session.progress = progress_bar(cfg.progress)
        session.progress.start()
        session.task = new_task(session.progress, cfg.steps, completed=state.step)
    return session


# The step is measured this many times and the least peak kept: gloo's worker thread can free a
# finished collective's buffers a little late, which only ever adds to a measurement (as in
# tests/sharding/test_offload.py, which keeps the least of 3). With constrain marks dropped from
# the per-rank graph (no copy per constraint), a small buffer's late free meets the peak more
# often: one measured run in ten read 4 bytes high on the zero3 + offload test, so 3 runs.
MEASURED_RUNS = 3


def measured_step(session: Session, batch: dict):
    """The step under `MemoryTracker`: its inputs plus everything it allocates, peak of live bytes.

    Counting every allocation slows the step, so it is done at the run's first step only (whose
    time is left out of the median anyway), `MEASURED_RUNS` times on the same inputs: the step is
    a pure function, and torch's generator is put back before each repeat, so the outputs kept are
    the ones a single run gives.
    """
    state, generator, runs = session.state, torch.get_rng_state(), []
    for _ in range(MEASURED_RUNS):
        torch.set_rng_state(generator)  # every run draws what one run draws
        io_before = io_bytes()
        with MemoryTracker(session.device) as memory:
            memory.track(batch)
            memory.track(state.params, param_memory_kind(session.cfg.offload))
            memory.track(state.opt_state, state_memory_kind(session.cfg.offload))
            outputs = session.compiled_train(state.params, state.opt_state, batch)
        runs.append(memory)
        session.disk_io_bytes_measured = {key: value - io_before[key] for key, value in io_bytes().items()}
    session.peak_bytes_measured = min(m.peak_bytes for m in runs)
    session.device_peak_bytes_measured = min(m.device_peak_bytes for m in runs)
    hosts = [m.host_peak_bytes for m in runs if m.host_peak_bytes is not None]
    session.host_peak_bytes_measured = min(hosts) if hosts else None
    disks = [m.disk_peak_bytes for m in runs if m.disk_peak_bytes is not None]
    session.disk_peak_bytes_measured = min(disks) if disks else None
    return outputs


def train_step(session: Session) -> dict[str, float]:
    """Run step `session.state.step`; advance the state; return this step's loss, grad norm and time."""
    state = session.state
    batch = local_batch(session, "train", state.step)
    started = time.perf_counter()
    if session.peak_bytes_measured is None:
        params, opt_state, metrics = measured_step(session, batch)
    elif session.pipeline is not None and session.timeline is None:  # the first step after the measured one
        with timeline.recording() as records:
            params, opt_state, metrics = session.compiled_train(state.params, state.opt_state, batch)
        session.timeline = timeline.spans(records)
    elif session.lowered.transfers and session.copies is None:  # offloaded: when each copy ran, in one step
        with copies.recording() as spans:
            params, opt_state, metrics = session.compiled_train(state.params, state.opt_state, batch)
        session.copies = {"count": len(spans), "bytes": sum(span["bytes"] for span in spans),
                          "hidden_fraction": copies.hidden_fraction(spans),
                          "spans": [{key: (value - started if key != "kind" and key != "bytes" else value)
                                     for key, value in span.items()} for span in spans]}
    else:
        params, opt_state, metrics = session.compiled_train(state.params, state.opt_state, batch)
    loss = metrics["loss"].item()  # also waits for the step (CUDA is asynchronous)
    seconds = time.perf_counter() - started
    session.state = TrainState(params, opt_state, state.step + 1)
    session.step_times.append(seconds)
    return {"loss": loss, "grad_norm": metrics["grad_norm"].item(), "step_time_s": seconds}


def evaluate(session: Session) -> float:
    """Mean validation loss over `eval_batches` fixed batches (a collective step: every rank calls it)."""
    losses = [session.compiled_eval(session.state.params, local_batch(session, "val", i)).item()
              for i in range(session.cfg.eval_batches)]
    return sum(losses) / len(losses)


def log_step(session: Session, metrics: dict[str, float]) -> None:
    """Accumulate the step; every `log_every` steps (and at the end) evaluate when due and write (rank 0)."""
    cfg, window, step = session.cfg, session.window, session.state.step  # `step` steps are done
    session.first_loss = metrics["loss"] if session.first_loss is None else session.first_loss
    window.loss_sum, window.steps = window.loss_sum + metrics["loss"], window.steps + 1
    window.step_seconds += metrics["step_time_s"]
    if session.writer is not None:
        session.writer.scalar("step_time_s", metrics["step_time_s"], step)
    last = step == last_step(cfg)
    if step % cfg.log_every and not last:
        return
    tokens = window.steps * cfg.data.global_batch * session.seq_len
    record = {"loss": window.loss_sum / window.steps, "grad_norm": metrics["grad_norm"],
              "lr": session.schedule(torch.tensor(step - 1)).item(),
              "tokens_per_s": tokens / (time.perf_counter() - window.started),
              "step_time_s": window.step_seconds / window.steps}
    if cfg.eval_batches and (step % cfg.eval_every == 0 or last):
        record["val_loss"] = evaluate(session)
    if session.writer is not None:
        session.writer.write(step, record)
        session.progress.update(session.task, **bar_fields(record["loss"], record["tokens_per_s"],
                                                           record["step_time_s"]))
    session.window = Window()


def apply_nonfinite_policy(session: Session, before: TrainState, metrics: dict[str, float]) -> None:
    """A step with an inf/nan loss or gradient norm stops the run, or (nonfinite=skip) is undone.

    Under fp16 loss scaling an inf gradient norm is the scaler's business: the step already kept
    the params and shrank the scale (undoing it here would undo the shrink), so only the loss counts.
    """
    grad_norm = 0.0 if build_precision(session.cfg).loss_scaling else metrics["grad_norm"]
    if not session.guard.keep(before.step, metrics["loss"], grad_norm):
        session.state = TrainState(before.params, before.opt_state, before.step + 1)


def save_if_due(session: Session) -> None:
    """Every `checkpoint_every` steps and at the run's last step (every rank, together)."""
    state, checkpointer = session.state, session.checkpointer
    if checkpointer is not None and checkpointer.due(state.step, last_step(session.cfg)):
        checkpointer.save(state.step, state.params, state.opt_state)


def advance_progress(session: Session) -> None:
    if session.progress is not None:
        session.progress.advance(session.task)


def rank_report(session: Session) -> dict:
    """This rank's own figures (every rank's are gathered to rank 0 for the summary)."""
    times = session.step_times[1:] or session.step_times  # the first step warms caches
    return {"rank": session.rank, "coordinate": dict(zip(session.mesh.axis_names, session.mesh.coordinate)),
            "step_time_s": statistics.median(times) if times else None,
            "peak_bytes_predicted": session.lowered.cost["peak_bytes"],
            "peak_bytes_measured": session.peak_bytes_measured,
            "device_peak_bytes_predicted": session.lowered.cost["device_peak_bytes"],
            "device_peak_bytes_measured": session.device_peak_bytes_measured,
            "host_bytes_predicted": session.lowered.cost["host_bytes"],
            "host_bytes_measured": session.host_peak_bytes_measured,
            "disk_bytes_predicted": session.lowered.cost["disk_bytes"],
            "disk_bytes_measured": session.disk_peak_bytes_measured,
            "disk_io_bytes_measured": session.disk_io_bytes_measured,
            **({"pipeline_timeline": session.timeline} if session.timeline is not None else {}),
            **({"copies": session.copies} if session.copies is not None else {})}


def _schedule_facts(pipeline, stages: int, microbatches: int) -> tuple[float | None, str]:
    """(the bubble by its formula, the schedule as every rank runs it, printed)."""
    from sharding.schedules import SCHEDULES, bubble_formula, render

    schedule = schedule_for(pipeline, stages, microbatches)
    formula = bubble_formula(schedule.name, stages, microbatches, pipeline.virtual) if schedule.name in SCHEDULES \
        else None  # a hand-written schedule has no published formula
    return formula, render(schedule)


def describe_schedule(pipeline, stages: int, microbatches: int) -> str:
    """The schedule each pipeline rank runs, and its bubble by the formula."""
    formula, printed = _schedule_facts(pipeline, stages, microbatches)
    return printed + (f"\nbubble (formula): {formula:.3f} of each rank's step" if formula is not None else "")


def pipeline_summary(session: Session, ranks: list[dict]) -> dict:
    """The schedule, its formula bubble, and the measured timeline of the first pipeline (the ranks at
    coordinate 0 of every other axis), times from its first action, with its measured bubble."""
    pipeline, cfg = session.pipeline, session.cfg
    axis = session.mesh.axis_names.index(pipeline.axis)
    first = [r for r in ranks if all(c == 0 for a, c in enumerate(r["coordinate"].values()) if a != axis)]
    first.sort(key=lambda r: r["coordinate"][pipeline.axis])
    per_rank = [r.get("pipeline_timeline") or [] for r in first]
    formula, printed = _schedule_facts(pipeline, len(first), cfg.pipeline.microbatches)
    found = {"schedule": str(pipeline.schedule) if isinstance(pipeline.schedule, str) else pipeline.schedule.name,
             "microbatches": cfg.pipeline.microbatches, "virtual": pipeline.virtual, "stages": len(first),
             "bubble_formula": formula, "printed": printed}
    if all(per_rank):
        start = min(span["start"] for spans in per_rank for span in spans)
        found["bubble_measured"] = timeline.bubble(per_rank)
        found["timeline"] = [[{**span, "start": span["start"] - start, "end": span["end"] - start}
                              for span in spans] for spans in per_rank]
    return found


def finish(session: Session) -> dict:
    """Gather every rank's figures; rank 0 writes `summary.json` and `loss.png`. Returns the summary."""
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, rank_report(session))
    if session.writer is None:
        return {}
    session.progress.stop()
    session.writer.close()
    history = session.writer.history
    plot_losses(history, session.output_dir / "loss.png")
    cfg, cost = session.cfg, session.lowered.cost
    summary = {
        "strategy": cfg.strategy.name, "mesh": mesh_shape(cfg.mesh), "world_size": len(ranks),
        "model": f"{cfg.model.arch}/{cfg.model.size}", "dtype": cfg.model.dtype, "device": session.device.type,
        "remat": cfg.remat,
        "steps": session.state.step, "first_loss": session.first_loss, "final_loss": history[-1]["loss"],
        "val_loss": history[-1].get("val_loss"), "tokens_per_s": history[-1]["tokens_per_s"],
        "step_time_s": max(r["step_time_s"] for r in ranks),  # the step is as slow as its slowest rank
        "compile_s": session.compile_s, "seconds": time.perf_counter() - session.started,
        "offload": cfg.offload,
        "cost": {"bytes_moved": cost["bytes_moved"], "bytes_by_kind": cost["bytes_by_kind"],
                 "bytes_by_phase": cost["bytes_by_phase"],
                 "num_collectives": cost["num_collectives"], "peak_bytes_predicted": cost["peak_bytes"],
                 "device_peak_bytes_predicted": cost["device_peak_bytes"], "host_bytes_predicted": cost["host_bytes"],
                 "transfer_bytes": cost["transfer_bytes"], "disk_bytes_predicted": cost["disk_bytes"],
                 "disk_io_bytes": cost["disk_io_bytes"]},
        "collectives": collective_counts(session.lowered.collectives),
        "ranks": ranks,
    }
    if session.pipeline is not None:
        summary["pipeline"] = pipeline_summary(session, ranks)
    (session.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train(cfg: Any, rank: int, device: torch.device, output_dir: pathlib.Path | None) -> dict:
    """The whole loop on this rank (torch.distributed already initialised). Rank 0 returns the summary."""
    session = setup(cfg, rank, device, output_dir)
    try:
        while session.state.step < last_step(cfg):
            before = session.state
            metrics = train_step(session)
            apply_nonfinite_policy(session, before, metrics)
            log_step(session, metrics)
            save_if_due(session)
            advance_progress(session)
        return finish(session)
    finally:
        if session.progress is not None:
            session.progress.stop()
