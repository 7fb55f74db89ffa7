"""One step's communication timeline on this rank: when each collective was issued, when the
compute stream started to wait for it, and when its result was there.

`instrument(lowered)` is a copy of a lowered step whose graph notes the time right after each
collective is issued and around each wait; run it inside `sharding.timeline.recording()` (one
recording mechanism for a step's measured times; these entries are "step_start", "step_end",
"collective_issue" and "collective_wait"). The plain step has no
such nodes, so only a step that asks for a timeline pays for it. A collective is *in flight*
from its issue to the end of its wait (gloo and NCCL run it beside the compute stream); the
compute stream is *blocked* from the wait's start to its end. A collective that finished while
the rank computed shows a wait of about zero: its communication was hidden.
"""
from __future__ import annotations

import dataclasses
import time

import torch.fx as fx

from . import collectives
from .timeline import record


def started() -> None:
    record("step_start", time.perf_counter())


def finished() -> None:
    record("step_end", time.perf_counter())


def issued(index: int, _result) -> None:
    """Collective `index` was just issued (`_result`, its issue node's value, keeps this after it)."""
    record("collective_issue", index, time.perf_counter())


def timed_wait(index: int, result, keep_alive=None, kind: str = "collective", label: str = ""):
    """`collectives.wait`, noting when it started and returned."""
    begin = time.perf_counter()
    out = collectives.wait(result, keep_alive, kind, label)
    record("collective_wait", index, begin, time.perf_counter())
    return out


def _stream(record: dict) -> str:
    return f"{record['kind']}({record['op']})" if record.get("op") else record["kind"]


def instrument(lowered):
    """A copy of `lowered` (a `sharding.Lowered`) whose step records its collectives' times."""
    source = lowered.graph
    graph = fx.Graph()
    env: dict = {}
    meta: list[dict] = []
    index: dict = {}  # issue node -> its position in `meta`
    marked_start = False
    for node in source.graph.nodes:
        if node.op != "placeholder" and not marked_start:
            graph.call_function(started, ())  # after the inputs, before the first op
            marked_start = True
        if node.op == "output":
            graph.call_function(finished, ())
        new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
        if "fp_collective" in node.meta:
            record = node.meta["fp_collective"]
            index[node] = len(meta)
            meta.append({"stream": f"{_stream(record)} over {'+'.join(record['axes'])}", "kind": record["kind"],
                         "bytes": record["bytes"], "phase": record.get("phase") or "forward"})
            graph.call_function(issued, (index[node], new))
        if node.target is collectives.WAIT:
            new.target = timed_wait
            new.args = (index[node.args[0]], *new.args)
    module = fx.GraphModule(source, graph)
    module.fp_timeline_collectives = meta
    return dataclasses.replace(lowered, graph=module)


def spans(records: list, collectives_meta: list[dict]) -> dict:
    """One step's timeline: {start, end, collectives: [{stream, kind, phase, bytes, issue, wait, ready}]}
    (seconds on the machine's monotonic clock, comparable across the processes of one host)."""
    starts = [r[1] for r in records if r[0] == "step_start"]
    ends = [r[1] for r in records if r[0] == "step_end"]
    issues = {r[1]: r[2] for r in records if r[0] == "collective_issue"}
    waits = {r[1]: (r[2], r[3]) for r in records if r[0] == "collective_wait"}
    found = [{**collectives_meta[index], "issue": at, "wait": waits[index][0], "ready": waits[index][1]}
             for index, at in sorted(issues.items(), key=lambda item: item[1]) if index in waits]
    return {"start": starts[0], "end": ends[-1], "collectives": found}


def hidden_fraction(timeline: dict) -> float:
    """The share of the collectives' in-flight time during which the compute stream was not blocked
    on them (1: all communication overlapped compute; 0: the rank waited for all of it)."""
    flight = sum(c["ready"] - c["issue"] for c in timeline["collectives"])
    blocked = sum(c["ready"] - c["wait"] for c in timeline["collectives"])
    return 1 - blocked / flight if flight > 0 else 1.0
