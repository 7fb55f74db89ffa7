"""A pipelined step's measured timeline: when each rank ran each action, and how long it waited.

The split stage (`sharding.pipelining`) puts a `mark(label)` node where a rank starts each of its
schedule's actions ("F0", "B1", "W2"; "F0.1" for chunk 1) and one ("end") after its last; each
`recv` adds the time it blocked; the optimizer's ops are marked "update". Outside `recording()` these nodes do nothing, so a step pays for
the timeline only when one is asked for.
`recording()` is also where `sharding.comm_timeline`'s instrumented step notes its collectives.
"""
from __future__ import annotations

import contextlib
import time

import torch.fx as fx

_records: list | None = None


@contextlib.contextmanager
def recording():
    """Record the marks and waits of the steps run inside; yields the list they are appended to."""
    global _records
    _records, found = [], None
    try:
        found = _records
        yield found
    finally:
        _records = None


def record(*entry) -> None:
    """Append `entry` when recording (`sharding.comm_timeline` keeps its collectives' times here too)."""
    if _records is not None:
        _records.append(entry)


def mark(label: str) -> None:
    record("mark", label, time.perf_counter())


def waited(started: float) -> None:
    """A receive that blocked from `started` until now."""
    record("wait", started, time.perf_counter())


def spans(records: list) -> list[dict]:
    """Per action: {action, start, end, idle} (seconds; idle: blocked in receives inside it)."""
    marks = [(label, at) for kind, label, at in records if kind == "mark"]
    out = []
    for (label, start), (_, end) in zip(marks, marks[1:]):
        idle = sum(min(b, end) - max(a, start) for kind, a, b in records
                   if kind == "wait" and a < end and b > start)
        out.append({"action": label, "start": start, "end": end, "idle": idle})
    return out


def bubble(per_rank: list[list[dict]]) -> float:
    """The idle fraction of the ranks' time from the first action's start to the last one's end (the
    pipeline bubble; the optimizer's update, after it, is left out)."""
    actions = [[s for s in spans_ if s["action"] != "update"] for spans_ in per_rank]
    start = min(s["start"] for spans_ in actions for s in spans_)
    end = max(s["end"] for spans_ in actions for s in spans_)
    busy = sum(s["end"] - s["start"] - s["idle"] for spans_ in actions for s in spans_)
    return 1 - busy / (len(per_rank) * (end - start))


fx.node._side_effectful_functions.add(mark)
