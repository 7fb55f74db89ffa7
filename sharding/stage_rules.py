"""Where each op of a pipelined program runs and which schedule action it belongs to (the split
stage's rules 2 and 4, `sharding.pipelining`): read off the traced joint graph, no rank involved.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .layout import Layout, layout_of
from .microbatch import microbatch_of
from .mincut import INFINITE, FlowGraph
from .phases import BACKWARD, FORWARD, OPTIMIZER, forward_nodes

def _ndim(node) -> int:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else 0


def assign_stages(graph: fx.Graph, in_stages: list, chosen: dict | None = None) -> dict:
    """Rules 1 and 2: every node's model stage, or None (on every stage that reads it); `chosen`
    gives the stage of forward ops that read no parameter (`move_free_ops`)."""
    chosen = chosen or {}
    phase_of = phases_of(graph)
    stage: dict = {}
    placeholders = iter(in_stages)
    forward_of = forward_nodes(list(graph.nodes))
    for node in graph.nodes:
        if node.op == "placeholder":
            stage[node] = next(placeholders)
            continue
        if node.op != "call_function":
            stage[node] = None
            continue
        inputs = [stage[a] for a in node.all_input_nodes if stage[a] is not None]
        phase = phase_of[node]
        if phase == BACKWARD:
            forward = forward_of.get(node.meta.get("seq_nr"))
            own = stage.get(forward) if forward is not None else None
            stage[node] = own if own is not None else min(inputs, default=None)
        elif phase == OPTIMIZER:
            tensors = [stage[a] for a in node.all_input_nodes if stage[a] is not None and _ndim(a) > 0]
            stage[node] = max(tensors or inputs, default=None)
        else:
            stage[node] = chosen.get(node, max(inputs, default=None))
    return stage


def _bytes(node, axis_sizes, depth: int = 8) -> int:
    """This rank's bytes of a value; an inserted node without a recorded value (a collective's
    wait) counts as its largest input."""
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return math.prod(local_shape(node, axis_sizes)) * value.element_size()
    if depth and node.all_input_nodes:
        return max(_bytes(a, axis_sizes, depth - 1) for a in node.all_input_nodes)
    return 0


def phases_of(graph: fx.Graph) -> dict:
    """Each node's phase (`sharding.phases`); a node the insert stage added (a collective's pieces)
    takes its inputs': backward if any is, else optimizer if any is, else forward."""
    phase: dict = {}
    for node in graph.nodes:
        own = node.meta.get("phase")
        if own is None:
            given = {phase.get(a) for a in node.all_input_nodes}
            own = BACKWARD if BACKWARD in given else OPTIMIZER if OPTIMIZER in given else FORWARD
        phase[node] = own
    return phase


def parameter_derived(graph: fx.Graph, stage: dict) -> set:
    """Values made from inputs that have a stage (parameters, their casts and gathers) and from
    constants only, not from the data: an op that reads one is bound to that parameter's stage."""
    found, constant = set(), set()
    for node in graph.nodes:
        if node.op == "placeholder" and stage[node] is not None:
            found.add(node)
        elif node.op == "get_attr" or (node.op == "call_function" and
                                       all(a in constant for a in node.all_input_nodes)):
            constant.add(node)
        elif node.op == "call_function" and all(a in found or a in constant for a in node.all_input_nodes):
            found.add(node)
    return found


def move_free_ops(graph: fx.Graph, stage: dict, stages: int, axis_sizes) -> dict:
    """Rule 2's choice for a forward op that reads no parameter (a norm's statistics, a residual
    add): of the stage the max rule gives and later ones, the side of each stage boundary where
    the fewest bytes cross it (a minimum cut; at equal bytes the later stage). Llama's RMS norm
    then runs where its weight is, and only the residual stream crosses. Returns the moved ops'
    stages (`stage` is updated for them only: `assign_stages` again updates what follows)."""
    bound = parameter_derived(graph, stage)
    phase = phases_of(graph)
    _forward = lambda node: phase[node] == FORWARD  # noqa: E731
    forward_of = forward_nodes(list(graph.nodes))
    moved: dict = {}
    for boundary in range(stages - 1):
        free = [n for n in graph.nodes if n.op == "call_function" and stage[n] == boundary
                and _forward(n) and n not in bound
                and not any(a in bound and stage[a] == boundary for a in n.all_input_nodes)]
        if not free:
            continue
        free_set = set(free)  # backward ops are left out: each follows its forward op (rule 2)
        pinned = {n for n in graph.nodes if n.op == "call_function" and stage[n] == boundary
                  and _forward(n)} - free_set
        index = {node: i for i, node in enumerate(free_set | pinned)}
        later = {u for n in index for u in n.users if u.op == "call_function" and stage.get(u) is not None
                 and stage[u] > boundary and _forward(u)}
        for node in later:
            index.setdefault(node, len(index))
        source, sink = len(index), len(index) + 1
        flow = FlowGraph(2 * len(index) + 2)
        for node, i in index.items():
            if node in later:
                flow.add_edge(i, sink, INFINITE)
                continue
            # A backward op reading the value moves with its forward op: the value is made no later.
            # Kept: an op bound to this stage, or read by another op the cut leaves out (an
            # optimizer op, the micro-batches' gradient sum).
            outside = [forward_of.get(u.meta.get("seq_nr"), u) if phase[u] == BACKWARD else u
                       for u in node.users if u not in index and u not in later]
            for reader in outside:
                if reader in index and reader not in later:
                    flow.add_edge(index[reader], i, INFINITE)
            if node in pinned or any(reader not in index for reader in outside):
                flow.add_edge(source, i, INFINITE)
            readers = [index[u] for u in node.users if u in index]
            if not readers:
                continue
            sent = len(index) + 2 + i  # the value itself: its bytes cross once however many read it
            flow.add_edge(i, sent, max(_bytes(node, axis_sizes), 1))
            for reader in readers:
                flow.add_edge(sent, reader, INFINITE)
                flow.add_edge(reader, i, INFINITE)  # a value read on this stage cannot be made later
        kept = flow.source_side(source, sink)
        for node in free:
            if index[node] not in kept:
                stage[node] = moved[node] = boundary + 1
    return moved


def assign_actions(graph: fx.Graph) -> dict:
    """Rule 4: each node's (kind, micro-batch): "F" or "B"; a node outside every micro-batch block
    (an inserted collective) takes its inputs' action when they agree."""
    phase = phases_of(graph)
    action: dict = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        index = microbatch_of(node)
        given = [action[a] for a in node.all_input_nodes if a in action]
        if index is None:
            if given and all(g == given[0] for g in given):
                action[node] = given[0]
            continue
        backward = phase[node] == BACKWARD or ("B", index) in given
        action[node] = ("B" if backward else "F", index)
    return action


def split_weight_gradients(graph: fx.Graph, stage: dict, action: dict, rank_of) -> None:
    """Zero-bubble schedules: a backward op that the gradient sent to the previous stage does not
    need is weight-gradient work, action W(i) instead of B(i) (Qi et al. 2023's B/W split, read off
    the joint graph)."""
    phase = phases_of(graph)
    needed: set = set()
    for node in reversed(list(graph.nodes)):
        if action.get(node, ("F",))[0] != "B" or stage.get(node) is None or \
                (microbatch_of(node) is None and phase[node] != BACKWARD):  # not the optimizer's norm
            continue
        sent = any(u.op == "call_function" and stage.get(u) is not None and rank_of(stage[u]) != rank_of(stage[node])
                   for u in node.users)
        if sent or any(u in needed for u in node.users if stage.get(u) == stage[node] and action.get(u) == action[node]):
            needed.add(node)
    for node, (kind, index) in list(action.items()):
        if kind == "B" and node not in needed and microbatch_of(node) is not None and stage.get(node) is not None:
            action[node] = ("W", index)


def forward_needs(graph: fx.Graph, stage: dict, rank_of) -> dict:
    """For each node on no stage: the stages of the ops that read it, one per rank (the first)."""
    needed: dict = {}
    for node in reversed(list(graph.nodes)):
        if node.op != "call_function" or stage[node] is not None:
            continue
        found = set()
        for user in node.users:
            if user.op == "output":
                continue
            found |= {stage[user]} if stage[user] is not None else needed.get(user, set())
        by_rank: dict = {}
        for s in sorted(found):
            by_rank.setdefault(rank_of(s), s)
        needed[node] = set(by_rank.values())
    return needed


def local_shape(node: fx.Node, axis_sizes) -> list:
    """This rank's shape of `node` (after localize `meta["val"]` is still the global value)."""
    layout = layout_of(node)
    shape = list(node.meta["val"].shape)
    return layout.local_shape(shape, axis_sizes) if isinstance(layout, Layout) else shape
