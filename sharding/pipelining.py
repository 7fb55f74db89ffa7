"""Stage 6 with a pipeline, split: each op on one pipeline stage, a value read on another rank
sent there, and the program ordered as the schedule runs it.

The rules (docs/pipelines.md; rules 2 and 4 are read off the graph in `sharding.stage_rules`):
1. An input lives where its spec's `stage` says (`P(..., stage=Stage("pp", k))`); an input
   without a stage (the batch, a step counter) is on every stage.
2. A forward op runs on the latest stage among its inputs (activations flow forward); a backward
   op on the stage of the forward op it differentiates (else the earliest of its inputs); an
   optimizer op on the latest stage of its tensor inputs (an update stays with its parameter; a
   0-dim norm or scale moves). A forward op that reads no parameter may run on a later stage,
   where the fewest bytes cross each boundary (a minimum cut). An op none of whose inputs has a
   stage is on no stage: every stage that reads it computes it (a mask, a position index).
3. A value read on a rank other than the one that makes it is sent once to each reading rank
   (`sharding.p2p`). An output whose spec has a stage is returned by that stage's rank (others
   return a meta tensor of its shape); an output without one (the loss) by every rank.
4. Ops of micro-batch i (`sharding.microbatch`) are its forward F(i) or, from the first backward
   op on, its backward B(i). The program is sorted by the start time of each op's action in the
   schedule's simulated timeline (`sharding.schedules`); an op outside every micro-batch runs just
   before its first reader (a parameter cast or gather) or just after its last input (the update).

Every rank lowers this same program; `select_rank` (at bind) keeps one rank's stages.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from . import lazy
from . import p2p, timeline
from .bind import AxisGroup
from .errors import SpecError
from .layout import annotate, annotation, layout_of
from .microbatch import microbatch_of
from .phases import OPTIMIZER
from .schedules import SCHEDULES, Action, Schedule, build, simulate, validate
from .stage_rules import (assign_actions, assign_stages, forward_needs, local_shape, move_free_ops, phases_of,
                          split_weight_gradients)
from .source import source_line

STAGE = "pp_stage"  # node.meta key: the model stage a node runs on
OUTPUTS = "pp_outputs"  # output node meta: per output position, per rank, an index into the outputs (or None)
ABSENT = "pp_absent"  # output node meta: per output position, this rank's (shape, dtype) of it


@dataclass(frozen=True)
class Pipeline:
    """`jit(pipeline=Pipeline(...))`: run the step as a pipeline over mesh axis `axis`.

    `schedule` is one of `sharding.schedules.SCHEDULES`, or a `Schedule` (per rank, the ordered
    actions; checked for deadlock here); `virtual` model chunks per rank (interleaved schedules).
    The micro-batches are the step's `sharding.microbatch` blocks; a step without any runs its
    stages in program order.
    """

    axis: str = "pp"
    schedule: str | Schedule = "1f1b"
    virtual: int = 1

    def __post_init__(self):
        if isinstance(self.schedule, Schedule):
            validate(self.schedule)  # a hand-written schedule that deadlocks fails here, before any rank runs
            object.__setattr__(self, "virtual", self.schedule.virtual)
            return
        if self.schedule not in SCHEDULES:
            raise SpecError(f"pipeline schedule {self.schedule!r} is not one of {SCHEDULES} (or a "
                            f"sharding.schedules.Schedule)")
        if not isinstance(self.virtual, int) or self.virtual < 1:
            raise SpecError(f"pipeline virtual stages per rank must be an int >= 1, got {self.virtual!r}")
        if self.virtual > 1 and self.schedule != "interleaved_1f1b":
            raise SpecError(f"virtual={self.virtual} stages per rank need schedule 'interleaved_1f1b', "
                            f"got {self.schedule!r}")


def schedule_for(pipeline: Pipeline, stages: int, microbatches: int) -> Schedule:
    """The pipeline's schedule for `stages` ranks and `microbatches` micro-batches."""
    if not isinstance(pipeline.schedule, Schedule):
        return build(pipeline.schedule, stages, microbatches, pipeline.virtual)
    given = pipeline.schedule
    if (given.stages, given.microbatches) != (stages, microbatches):
        raise SpecError(f"the pipeline's schedule {given.name!r} is for {given.stages} ranks and {given.microbatches} "
                        f"micro-batches, but the step runs {microbatches} micro-batches over {stages} ranks")
    return given


class _Splitter:
    """The rules' answers for one program: each node's stage and action, the schedule's timeline."""

    def __init__(self, graph_module: fx.GraphModule, in_stages: list, out_stages: list, pipeline: Pipeline,
                 axis: int, axis_sizes: tuple):
        self.old, self.pipeline, self.axis, self.axis_sizes = graph_module, pipeline, axis, tuple(axis_sizes)
        self.size = axis_sizes[axis]
        self.stages = self.size * pipeline.virtual
        self.in_stages, self.out_stages = in_stages, out_stages
        graph = graph_module.graph
        self.order = {node: i for i, node in enumerate(graph.nodes)}
        self._check_stages(in_stages)
        self._check_stages(out_stages)
        self.stage = assign_stages(graph, in_stages)
        moved = move_free_ops(graph, dict(self.stage), self.stages, self.axis_sizes)
        if moved:
            self.stage = assign_stages(graph, in_stages, moved)
        self.action = assign_actions(graph)
        self.phase = phases_of(graph)
        microbatches = sorted({microbatch_of(n) for n in graph.nodes if microbatch_of(n) is not None})
        self.schedule, self.start = None, {}
        if not microbatches:  # one pass in program order (an eval forward, a norm): no schedule to follow
            return
        if microbatches != list(range(len(microbatches))):
            raise SpecError(f"micro-batches must be numbered 0..m-1, got {microbatches}")
        self.schedule = schedule_for(pipeline, self.size, len(microbatches))
        if self.schedule.splits_backward:
            split_weight_gradients(graph, self.stage, self.action, self.rank)
        self.start = {(rank, span[0]): span[1] for rank, spans in enumerate(simulate(self.schedule).spans)
                      for span in spans}

    def _check_stages(self, in_stages) -> None:
        bad = sorted({s for s in in_stages if s is not None and not 0 <= s < self.stages})
        if bad:
            raise SpecError(f"stages {bad} are not stages of the pipeline: axis {self.pipeline.axis!r} of size "
                            f"{self.size} with {self.pipeline.virtual} virtual stage(s) per rank has stages "
                            f"0..{self.stages - 1}")

    def rank(self, stage: int) -> int:
        return stage % self.size

    def slot_of_action(self, node, stage: int) -> float | None:
        kind, index = self.action[node]
        return self.start[(self.rank(stage), Action(kind, index, stage // self.size))]


def split_stages(graph_module: fx.GraphModule, in_stages: list, out_stages: list, pipeline: Pipeline,
                 axis: int, axis_sizes: tuple) -> fx.GraphModule:
    """The pipelined program (rules 1-4): nodes tagged with their stage (`meta[STAGE]`), sends and
    receives between ranks, sorted by the timeline; the output node lists every rank's results
    and `meta[OUTPUTS]` says which are whose."""
    s = _Splitter(graph_module, in_stages, out_stages, pipeline, axis, axis_sizes)
    size = s.size
    graph = graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    # The stages each value on no stage is needed on: its readers', and every rank's for an output.
    extra: dict = {}
    for value, out_stage in zip(output.args[0], out_stages):
        if isinstance(value, fx.Node) and value.op == "call_function" and s.stage[value] is None:
            wanted = [out_stage] if out_stage is not None else list(range(size))
            extra.setdefault(value, set()).update(wanted)
    needed = forward_needs(graph, s.stage, s.rank)
    for value, wanted in extra.items():  # and what those values read
        _add_needs(value, wanted, s, needed)

    # Instances: (node, stage) for every op that runs; placeholders and constants are shared.
    instances = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        for stage in ([s.stage[node]] if s.stage[node] is not None else sorted(needed.get(node, ()))):
            instances.append((node, stage))

    def source(value: fx.Node, reader_stage: int):
        """How a reader on `reader_stage` gets `value`: ("local", key) or ("remote", producer key)."""
        if value.op != "call_function":
            if value.op == "placeholder" and s.stage[value] is not None and \
                    s.rank(s.stage[value]) != s.rank(reader_stage):
                return "remote", (value, s.stage[value])
            return "shared", value
        if s.stage[value] is None:
            local = next(st for st in needed[value] if s.rank(st) == s.rank(reader_stage))
            return "local", (value, local)
        if s.rank(s.stage[value]) == s.rank(reader_stage):
            return "local", (value, s.stage[value])
        return "remote", (value, s.stage[value])

    # Slots: when each instance runs (rule 4).
    slot: dict = {}
    readers: dict = {}
    for key in instances:
        node, stage = key
        inputs = [source(a, stage) for a in node.all_input_nodes]
        for how, producer in inputs:
            if how != "shared":
                readers.setdefault(producer, []).append(key)
        if microbatch_of(node) is not None:  # in an action: when the schedule starts it
            slot[key] = s.slot_of_action(node, stage)
        else:
            known = [slot.get(p) for how, p in inputs if how != "shared" and slot.get(p) is not None]
            slot[key] = max(known) if known else None
    for key in reversed(instances):  # an op outside every action: just before its first reader
        if slot[key] is None:
            later = [slot[r] for r in readers.get(key, ()) if slot[r] is not None]
            slot[key] = min(later) if later else -math.inf
    for key in instances:
        for how, producer in (source(a, key[1]) for a in key[0].all_input_nodes):
            if how == "shared" or slot.get(producer, -math.inf) <= slot[key]:
                continue
            raise SpecError(
                f"pipeline schedule {pipeline.schedule!r}: {key[0].name} (at {source_line(key[0])}) on stage "
                f"{key[1]} reads {producer[0].name} (at {source_line(producer[0])}) of stage {producer[1]}, "
                f"which the schedule runs later; a value may only flow as the schedule's actions do "
                f"(forward to the next stage, backward to the previous)")
    return _emit(s, graph_module, instances, slot, readers, source, output)


def _add_needs(value, wanted: set, s: _Splitter, needed: dict) -> None:
    stack = [value]
    while stack:
        node = stack.pop()
        if node.op != "call_function" or s.stage[node] is not None:
            continue
        have = needed.setdefault(node, set())
        ranks = {s.rank(x) for x in have}
        new = {w for w in wanted if s.rank(w) not in ranks}
        if new:
            have |= new
            stack.extend(node.all_input_nodes)


def _emit(s: _Splitter, graph_module: fx.GraphModule, instances, slot, readers, source, output):
    """The new graph, in timeline order, with the sends and receives."""
    graph = fx.Graph()
    env: dict = {}
    items = []  # (slot, position, tiebreak, what, payload)
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            env[node] = graph.node_copy(node, lambda a: env[a])
    for key in instances:
        items.append((slot[key], s.order[key[0]], 0, "op", key))
    remote: dict = {}  # (producer key, reading rank) -> the readers there
    for producer, keys in readers.items():
        for reader in keys:
            if s.rank(_stage_of(producer, s)) != s.rank(reader[1]):
                remote.setdefault((producer, s.rank(reader[1])), []).append(reader)
    out_positions: list = []  # per output position, per rank: ("key", key) / ("remote", producer) / None
    for value, out_stage in zip(output.args[0], s.out_stages):
        per_rank = []
        for rank in range(s.size):
            if out_stage is not None and rank != s.rank(out_stage):
                per_rank.append(None)
                continue
            if not isinstance(value, fx.Node):
                per_rank.append(("const", value))
                continue
            reader_stage = out_stage if out_stage is not None else rank
            how, producer = source(value, reader_stage) if value.op == "call_function" or \
                s.stage.get(value) is not None else ("shared", value)
            if how == "remote" and s.rank(producer[1]) != rank:
                remote.setdefault((producer, rank), [])
            per_rank.append((how, producer))
        out_positions.append(per_rank)
    tag = 0
    for (producer, rank), keys in remote.items():
        produced = slot.get(producer, -math.inf)
        reading = min((slot[k] for k in keys), default=math.inf)
        first = min((s.order[k[0]] for k in keys), default=len(s.order))
        reader_stage = min((k[1] for k in keys), default=rank)
        earliest = min(keys, key=lambda k: (slot[k], s.order[k[0]]), default=None)
        label = _action_label(earliest[0], earliest[1], s) if earliest is not None else None
        items.append((produced, s.order[producer[0]], 1, "send", (producer, rank, tag)))
        items.append((reading, first, -1, "recv", (producer, rank, tag, reader_stage, label)))
        tag += 1
    items.sort(key=lambda item: item[:3])
    group = AxisGroup((s.axis,))
    sends: dict = {}
    received: dict = {}
    current: dict = {}  # rank -> the action its program is in (a timeline mark where it changes)
    last_action = {}  # rank -> when its last action starts: the optimizer's ops from then on are "update"
    for (rank, _), start in s.start.items():
        last_action[rank] = max(last_action.get(rank, start), start)
    for when, _, _, what, payload in items:
        if what == "op":
            node, stage = payload
            reader_rank = s.rank(stage)
            label = _action_label(node, stage, s) or (
                "update" if s.phase[node] == OPTIMIZER and when >= last_action.get(reader_rank, math.inf) else None)
            if label is not None and current.get(reader_rank) != label:
                current[reader_rank] = label
                graph.call_function(timeline.mark, (label,)).meta[STAGE] = stage

            def mapped(arg, stage=stage, reader_rank=reader_rank):
                how, producer = source(arg, stage)
                if how == "shared":
                    return env[arg]
                if how == "remote":
                    return received[(producer, reader_rank)]
                return env[producer]

            new = graph.node_copy(node, mapped)
            new.meta = dict(node.meta)
            new.meta[STAGE] = stage
            env[payload] = new
        elif what == "send":
            producer, rank, number = payload
            value = env[producer] if producer in env else env[producer[0]]
            new = graph.call_function(p2p.send, (value, rank, number, group))
            new.meta[STAGE] = producer[1]
            new.meta["fp_p2p"] = _record(producer[0], s, rank)
            sends.setdefault(s.rank(producer[1]), []).append((new, value))
        else:
            producer, rank, number, reader_stage, label = payload
            if label is not None and current.get(rank) != label:  # a receive belongs to its reader's action
                current[rank] = label
                graph.call_function(timeline.mark, (label,)).meta[STAGE] = reader_stage
            val = producer[0].meta["val"]
            new = graph.call_function(p2p.recv, (tuple(local_shape(producer[0], s.axis_sizes)), val.dtype,
                                                 val.device, s.rank(producer[1]), number, group))
            new.meta["val"] = val
            new.meta[STAGE] = reader_stage
            if annotation(producer[0]) is not None:
                annotate(new, layout_of(producer[0]))
            received[(producer, rank)] = new
    for rank in sorted(current):
        graph.call_function(timeline.mark, ("end",)).meta[STAGE] = rank
    for rank, started in sorted(sends.items()):
        done = graph.call_function(p2p.wait_sends, ([n for n, _ in started], [v for _, v in started]))
        done.meta[STAGE] = rank
    flat, table = [], []
    for per_rank in out_positions:
        row = []
        for entry in per_rank:
            if entry is None:
                row.append(None)
                continue
            how, producer = entry
            if how == "const":
                node = producer
            elif how == "shared":
                node = env[producer]
            elif how == "remote":
                node = received[(producer, len(row))]
            else:
                node = env[producer]
            row.append(len(flat))
            flat.append(node)
        table.append(row)
    out = graph.output(tuple(flat))
    out.meta[OUTPUTS] = table
    out.meta[ABSENT] = [(tuple(local_shape(v, s.axis_sizes)), v.meta["val"].dtype) if isinstance(v, fx.Node)
                        else None for v in output.args[0]]
    result = lazy.module(graph_module, graph)
    return result


def _action_label(node, stage: int, s: _Splitter) -> str | None:
    """"F3", "B0", "W2" ("F3.1" for chunk 1) for an op in a micro-batch, else None."""
    if microbatch_of(node) is None or node not in s.action:
        return None
    kind, index = s.action[node]
    chunk = stage // s.size
    return f"{kind}{index}" + (f".{chunk}" if s.pipeline.virtual > 1 else "")


def _stage_of(producer, s: _Splitter) -> int:
    return producer[1]


def _record(node: fx.Node, s: _Splitter, to_rank: int) -> dict:
    val = node.meta["val"]
    local = math.prod(local_shape(node, s.axis_sizes))
    return {"kind": "p2p", "axes": [s.pipeline.axis], "bytes": local * val.element_size(),
            "phase": node.meta.get("phase") or "forward", "source": source_line(node) or node.name,
            "leaf": node.meta.get("leaf"), "value": node.name, "shape": tuple(val.shape),
            "dtype": str(val.dtype).replace("torch.", ""), "to": to_rank}


def select_rank(graph_module: fx.GraphModule, rank: int, size: int) -> fx.GraphModule:
    """The pipelined program of one rank (coordinate `rank` of the pipeline axis): its stages'
    nodes, its outputs, and a meta tensor for each output another stage holds."""
    graph = fx.Graph()
    env: dict = {}
    for node in graph_module.graph.nodes:
        if node.op == "output":
            outputs = []
            for position, row in enumerate(node.meta[OUTPUTS]):
                index = row[rank]
                if index is None:
                    outputs.append(graph.call_function(absent, node.meta[ABSENT][position]))
                else:
                    chosen = node.args[0][index]
                    outputs.append(env[chosen] if isinstance(chosen, fx.Node) else chosen)
            graph.output(tuple(outputs))
            continue
        if node.op == "call_function" and node.meta.get(STAGE) % size != rank:
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
    return lazy.module(graph_module, graph)


def absent(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """What a rank returns for a value another stage holds: its shape and dtype, no storage."""
    return torch.empty(shape, dtype=dtype, device="meta")


__all__ = ["Pipeline", "split_stages", "select_rank", "assign_stages", "assign_actions", "operator"]
