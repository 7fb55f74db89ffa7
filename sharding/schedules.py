"""Pipeline-parallel schedules as data (per rank, the ordered F/B/W actions) and a simulator that
checks one for deadlock and measures its bubble.

`p` ranks, `m` micro-batches, `v` chunks per rank; rank r's chunk c is model stage `c*p + r`
(Megatron's interleaving), so a micro-batch's forward visits rank 0..p-1 v times over.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .errors import ShardingError

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1")
KINDS = ("F", "B", "W")


class ScheduleError(ShardingError):
    """A schedule that deadlocks, misses or repeats an action, or a bad (name, p, m, v)."""


@dataclass(frozen=True, order=True)
class Action:
    """One compute step: "F" forward, "B" backward (input gradient, plus the weight gradient
    when the schedule has no W), "W" weight gradient only; of one micro-batch on one chunk."""
    kind: str
    microbatch: int
    chunk: int = 0

    def __str__(self):
        """"F3" on chunk 0, "F3.1" (microbatch.chunk) on any other chunk."""
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


@dataclass(frozen=True)
class Schedule:
    """`actions[r]` is rank r's actions in execution order."""
    name: str
    stages: int
    microbatches: int
    virtual: int
    actions: tuple

    def model_stage(self, rank: int, chunk: int) -> int:
        return chunk * self.stages + rank

    @property
    def splits_backward(self) -> bool:
        return any(a.kind == "W" for rank in self.actions for a in rank)


def _check_sizes(p: int, m: int, v: int = 1) -> None:
    for label, value in (("stages", p), ("microbatches", m), ("virtual", v)):
        if not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{label} must be a positive int, got {value!r}")


def _check_name(name: str) -> None:
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {name!r}; expected one of {', '.join(SCHEDULES)}")


def gpipe(p: int, m: int) -> Schedule:
    """All forwards, then all backwards: simplest, but every rank holds all m activations."""
    _check_sizes(p, m)
    rank = tuple(Action("F", i) for i in range(m)) + tuple(Action("B", i) for i in range(m))
    return Schedule("gpipe", p, m, 1, (rank,) * p)


def _one_f_one_b_rank(forwards: list, backwards: list, warmup: int) -> tuple:
    """`warmup` forwards, then one forward and one backward in turn, then the remaining backwards."""
    steady = len(forwards) - warmup
    order = forwards[:warmup]
    for j in range(steady):
        order += [forwards[warmup + j], backwards[j]]
    return tuple(order + backwards[steady:])


def one_f_one_b(p: int, m: int) -> Schedule:
    """PipeDream-flush / Megatron: rank r runs min(p-r-1, m) forwards ahead, so it holds at most
    p - r activations instead of GPipe's m, for the same bubble."""
    _check_sizes(p, m)
    forwards, backwards = ([Action(k, i) for i in range(m)] for k in "FB")
    actions = tuple(_one_f_one_b_rank(forwards, backwards, min(p - r - 1, m)) for r in range(p))
    return Schedule("1f1b", p, m, 1, actions)


def interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """Megatron-LM's interleaved 1F1B (Narayanan et al. 2021): v chunks per rank shrink the
    bubble v-fold. Forwards go chunk by chunk in groups of p micro-batches; backwards in the same
    groups with the chunks reversed. Warmup is Megatron's (p-r-1)*2 + (v-1)*p (p-r-1 for v = 1,
    which makes v = 1 exactly 1f1b)."""
    _check_sizes(p, m, v)
    if m % p:
        raise ScheduleError(f"interleaved_1f1b needs microbatches divisible by stages (it runs them "
                            f"in groups of p); got m={m}, p={p}: use m={m + p - m % p} or v=1")

    def order(k, reverse):
        chunk = (k // p) % v
        return k // (p * v) * p + k % p, v - 1 - chunk if reverse else chunk
    forwards, backwards = ([Action(kind, *order(k, kind == "B")) for k in range(m * v)] for kind in "FB")
    warmups = [p - r - 1 if v == 1 else min((p - r - 1) * 2 + (v - 1) * p, m * v) for r in range(p)]
    actions = tuple(_one_f_one_b_rank(forwards, backwards, w) for w in warmups)
    return Schedule("interleaved_1f1b", p, m, v, actions)


def zb_h1(p: int, m: int, delay_weights: bool = True) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", sec. 2.1): 1F1B with the backward
    split into B (input gradient, on the critical path) and W (weight gradient, any time after B).

    Rank r runs 1F1B's warmup (p-r-1 forwards) and steady F,B pairs, but delays its W's by r
    micro-batches, so B's travel back through the ranks one W sooner per stage; the delayed W's
    fill the cooldown, one after each B, the rest at the end. Every rank then holds up to p
    activations (F to W), 1F1B's peak, which 1F1B reaches on rank 0 only. With F = B = W and
    m >= p the bubble is (p-1) per rank, a third of 1F1B's 3(p-1).

    `delay_weights=False` runs each W right after its B instead: rank r holds p - r, exactly as in
    1F1B, and only the faster B's remain: a 2(p-1) bubble with F = B = W.
    """
    _check_sizes(p, m)
    actions = []
    for r in range(p):
        warmup, lag = min(p - r - 1, m), r if delay_weights else 0
        order = [Action("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            order += [Action("F", warmup + i), Action("B", i)]
            order += [Action("W", i - lag)] if i >= lag else []
        done = max(0, m - warmup - lag)  # W's run so far
        for i in range(m - warmup, m):
            order.append(Action("B", i))
            if done < i + 1 - lag:
                order.append(Action("W", done))
                done += 1
        actions.append(tuple(order + [Action("W", i) for i in range(done, m)]))
    return Schedule("zb_h1" if delay_weights else "zb_h1 (W undelayed)", p, m, 1, tuple(actions))


def build(name: str, stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """The named schedule, validated (complete and deadlock-free)."""
    _check_name(name)
    if virtual != 1 and name != "interleaved_1f1b":
        raise ScheduleError(f"schedule {name!r} runs one chunk per rank, got virtual={virtual}: "
                            f"use virtual=1, or 'interleaved_1f1b' for virtual stages")
    if name == "interleaved_1f1b":
        schedule = interleaved_1f1b(stages, microbatches, virtual)
    else:
        schedule = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb_h1": zb_h1}[name](stages, microbatches)
    validate(schedule)
    return schedule


def validate(schedule: Schedule) -> None:
    """Every rank runs exactly one F and one B (and one W when split) per (micro-batch, chunk), in
    an order that cannot deadlock; raises ScheduleError saying which rank and action is wrong."""
    p, m, v = schedule.stages, schedule.microbatches, schedule.virtual
    _check_sizes(p, m, v)
    if len(schedule.actions) != p:
        raise ScheduleError(f"{schedule.name}: expected actions for {p} ranks, got {len(schedule.actions)}")
    kinds = KINDS if schedule.splits_backward else KINDS[:2]
    expected = Counter(Action(k, i, c) for k in kinds for i in range(m) for c in range(v))
    for rank, actions in enumerate(schedule.actions):
        got = Counter(actions)
        missing, extra = expected - got, got - expected
        found = [f"missing {_names(missing)}"] * bool(missing) + [f"unexpected or repeated {_names(extra)}"] * bool(extra)
        if found:
            raise ScheduleError(f"{schedule.name} rank {rank}: {'; '.join(found)} (expected one "
                                f"{'/'.join(kinds)} per micro-batch 0..{m - 1} and chunk 0..{v - 1})")
    simulate(schedule)


def _names(actions: Counter) -> str:
    return ", ".join(map(str, sorted(actions.elements())))


@dataclass
class Timeline:
    """When each action runs: `spans[r]` is rank r's (action, start, end) in order; `bubble` is the
    ranks' idle time over p * makespan."""
    schedule: Schedule
    spans: tuple
    makespan: float
    bubble: float


def _dependencies(schedule: Schedule, action: Action, rank: int) -> list:
    """(kind, micro-batch, model stage) that must finish before `action` on `rank` may start."""
    stage, last = schedule.model_stage(rank, action.chunk), schedule.stages * schedule.virtual - 1
    i = action.microbatch
    if action.kind == "F":
        return [("F", i, stage - 1)] if stage > 0 else []
    if action.kind == "B":
        return [("F", i, stage)] + ([("B", i, stage + 1)] if stage < last else [])
    return [("B", i, stage)]


def _durations(schedule: Schedule, forward: float, backward: float, weight: float | None) -> dict:
    """A chunk holds 1/v of a rank's layers; with W split off, B keeps the input-gradient part."""
    v = schedule.virtual
    if not schedule.splits_backward:
        return {"F": forward / v, "B": backward / v}
    weight = backward / 2 if weight is None else weight
    if not 0 <= weight <= backward:
        raise ScheduleError(f"weight is the weight-gradient part of backward={backward}, got weight={weight}")
    return {"F": forward / v, "B": (backward - weight) / v, "W": weight / v}


def simulate(schedule: Schedule, forward: float = 1.0, backward: float = 2.0, weight: float | None = None) -> Timeline:
    """Run each rank's list in order, each action as soon as its rank is free and its dependencies
    are done (communication is free); ScheduleError if some rank's next action can never start."""
    p, duration = schedule.stages, _durations(schedule, forward, backward, weight)
    unknown = {a.kind for rank in schedule.actions for a in rank} - set(duration)
    if unknown:
        raise ScheduleError(f"{schedule.name}: unknown action kinds {sorted(unknown)}; expected {'/'.join(KINDS)}")
    finished, spans, clock = {}, [[] for _ in range(p)], [0.0] * p
    progress = True
    while progress:
        progress = False
        for rank, actions in enumerate(schedule.actions):
            while len(spans[rank]) < len(actions):
                action = actions[len(spans[rank])]
                needs = _dependencies(schedule, action, rank)
                if any(need not in finished for need in needs):
                    break
                start = max([clock[rank]] + [finished[need] for need in needs])
                clock[rank] = start + duration[action.kind]
                finished[(action.kind, action.microbatch, schedule.model_stage(rank, action.chunk))] = clock[rank]
                spans[rank].append((action, start, clock[rank]))
                progress = True
    stuck = [(rank, actions[len(spans[rank])]) for rank, actions in enumerate(schedule.actions)
             if len(spans[rank]) < len(actions)]
    if stuck:
        raise ScheduleError(_deadlock(schedule, stuck, finished))
    makespan = max(clock)
    busy = sum(end - start for rank in spans for _, start, end in rank)
    bubble = (p * makespan - busy) / (p * makespan) if makespan else 0.0
    return Timeline(schedule, tuple(map(tuple, spans)), makespan, bubble)


def _deadlock(schedule: Schedule, stuck: list, finished: dict) -> str:
    """Each stuck rank's next action and the dependencies it waits for."""
    waits = []
    for rank, action in stuck:
        needs = [f"{kind}{i} of stage {stage} (rank {stage % schedule.stages})"
                 for kind, i, stage in _dependencies(schedule, action, rank) if (kind, i, stage) not in finished]
        waits.append(f"rank {rank} next runs {action} but waits for {', '.join(needs)}")
    return (f"{schedule.name} deadlocks: {'; '.join(waits)}; reorder the ranks' actions so each "
            f"dependency runs before the action that needs it")


def in_flight(schedule: Schedule) -> list:
    """Per rank, the most (micro-batch, chunk) activations held at once, running the list in order:
    alive from F until W when the backward is split (W still needs the layer inputs), else until B."""
    release = "W" if schedule.splits_backward else "B"
    peaks = []
    for actions in schedule.actions:
        alive = peak = 0
        for action in actions:
            alive += (action.kind == "F") - (action.kind == release)
            peak = max(peak, alive)
        peaks.append(peak)
    return peaks


def _label(schedule: Schedule, action: Action) -> str:
    """Interleaved schedules always name the chunk ("F3.0"), so columns read alike."""
    return f"{action}.0" if schedule.virtual > 1 and action.chunk == 0 else str(action)


def _header(schedule: Schedule) -> str:
    return f"{schedule.name} p={schedule.stages} m={schedule.microbatches} v={schedule.virtual}"


def render(schedule: Schedule) -> str:
    """A header naming the schedule and sizes, then "rank r: F0 F1 B0 ..." per rank."""
    return "\n".join([_header(schedule)] + [f"rank {r}: " + " ".join(_label(schedule, a) for a in actions)
                                 for r, actions in enumerate(schedule.actions)])


def render_timeline(timeline: Timeline, width: int = 72) -> str:
    """ASCII chart, one row per rank, time left to right: F/B/W while busy, '.' while idle."""
    scale, rows = timeline.makespan / width, []
    for rank, spans in enumerate(timeline.spans):
        cells = ["."] * width
        for action, start, end in spans:
            for col in range(int(start / scale + 0.5), int(end / scale + 0.5)):
                cells[min(col, width - 1)] = action.kind
        rows.append(f"rank {rank} |{''.join(cells)}|")
    header = f"{_header(timeline.schedule)}: makespan {timeline.makespan:g}, bubble {timeline.bubble:.3f}"
    return "\n".join([header] + rows)


def bubble_formula(name: str, p: int, m: int, v: int = 1) -> float:
    """The published bubble fraction of the makespan: (p-1)/(m+p-1) for GPipe and 1F1B (any F, B
    costs), (p-1)/(v*m+p-1) interleaved, (p-1)/(3m+p-1) for ZB-H1 with F = B = W and m >= p
    (the paper's (p-1)/(3m) of the ideal time; fewer micro-batches leave more bubble)."""
    _check_name(name)
    work = {"gpipe": m, "1f1b": m, "interleaved_1f1b": v * m, "zb_h1": 3 * m}[name]
    return (p - 1) / (work + p - 1)
