"""Schedule pass: gather a sharded parameter again for a later use instead of keeping the copy alive.

ZeRO-3 stores a parameter sharded on a data axis and all-gathers it before use. Autodiff reads
the same gathered value again in the backward, so without this pass every gathered parameter
stays alive from its forward use to its backward use: the full parameters at peak, which is
what ZeRO-3 exists to avoid. Rule: the uses of one gathered parameter are split into windows;
a new window starts when, since its previous use, some other gathered parameter was used (the
backward, or a weight shared by two layers). Each later window gets its own all-gather, just
before its first use; views of the gathered value are copied into the window. A parameter used
again right away (the output head's backward follows its forward) keeps its copy. Under a pipeline
(`sharding.pipelining`) the windows are a parameter's forward uses and its backward uses, over all
micro-batches: each stage gathers its parameters once for its forwards and once for its backwards
per step (2 x its parameters), whatever the number of micro-batches.

`activations=True` does the same for every other all-gather: an activation gathered for a forward
matmul and read again by its weight gradient (sequence parallelism's gathered norm output) keeps
only its shard alive in between and is gathered again in the backward, as Megatron-LM does
(Korthikanti et al. 2022 count the shard). `jit` turns it on with activation checkpointing, a
policy that trades recomputation (here: communication) for activation memory; a gather whose uses
are all in one window (a backward's own gathers) is left alone.
"""
from __future__ import annotations

import bisect

import torch.fx as fx

from ..cost import VIEW_OPS
from ..phases import BACKWARD
from ..pipelining import STAGE
from .chain import Chain, chains, is_parameter_gather, positions


def _uses(value: fx.Node) -> list[tuple[fx.Node, list[fx.Node]]]:
    """Each consumer of `value` reached through view ops, with the view chain leading to it."""
    found = []
    for user in value.users:
        if user.target in VIEW_OPS:
            found.extend((consumer, [user] + path) for consumer, path in _uses(user))
        else:
            found.append((user, []))
    return found


def use_windows(values: list[fx.Node], order: dict, counted: list[fx.Node] | None = None) -> dict:
    """value -> list of windows, each a list of (consumer, view path), in program order. A window
    ends where a use of another value of `counted` (default: `values`) comes between two uses."""
    uses = {value: sorted(_uses(value), key=lambda use: order[use[0]]) for value in values}
    counted_uses = uses if counted is None else {value: _uses(value) for value in counted}
    all_positions = sorted(order[consumer] for found in counted_uses.values() for consumer, _ in found)
    windows = {}
    for value, found in uses.items():
        groups: list[list] = []
        previous = None
        for consumer, path in found:
            here = order[consumer]
            between = (bisect.bisect_left(all_positions, here) - bisect.bisect_right(all_positions, previous)
                       if previous is not None else 0)
            if not groups or between > 0:
                groups.append([])
            groups[-1].append((consumer, path))
            previous = here
        windows[value] = groups
    return windows


def _windows_by_phase(values: list[fx.Node], order: dict) -> dict:
    """Under a pipeline: one window for a parameter's forward uses and one for its backward uses,
    however many micro-batches each runs (a stage gathers its parameters twice per step)."""
    windows = {}
    for value in values:
        found = sorted(_uses(value), key=lambda use: order[use[0]])
        groups = [[use for use in found if use[0].meta.get("phase") != BACKWARD],
                  [use for use in found if use[0].meta.get("phase") == BACKWARD]]
        windows[value] = [group for group in groups if group]
    return windows


def use_fresh_copies(graph: fx.Graph, windows: dict, fresh, order: dict) -> bool:
    """Every window after a value's first reads a fresh copy, `fresh(value, before=first consumer)`;
    views of the value are copied into the window. True when anything changed."""
    touched_views: list[fx.Node] = []
    for value, groups in windows.items():
        for group in groups[1:]:
            copy = fresh(value, group[0][0])
            copied: dict[fx.Node, fx.Node] = {}
            for consumer, path in group:
                current, source = copy, value
                for view in path:
                    if view not in copied:
                        with graph.inserting_before(consumer):
                            copied[view] = graph.node_copy(view, lambda a, s=source, v=current: v if a is s else a)
                        copied[view].meta = dict(view.meta)
                    current, source = copied[view], view
                consumer.replace_input_with(source, current)
                touched_views.extend(path)
    for view in reversed(sorted(set(touched_views), key=order.__getitem__)):  # views left without users
        if not view.users:
            graph.erase_node(view)
    return any(len(groups) > 1 for groups in windows.values())


def _gather_again(graph: fx.Graph, chain: Chain, before: fx.Node) -> fx.Node:
    """A copy of `chain` (same source, same record marked as a re-gather) placed before `before`."""
    copies = {}
    with graph.inserting_before(before):
        for node in (chain.front, chain.issue, chain.wait) + ((chain.result,) if chain.result is not chain.wait
                                                              else ()):
            copy = graph.node_copy(node, lambda arg: copies.get(arg, arg))
            copy.meta = dict(node.meta)
            copies[node] = copy
    copies[chain.issue].meta["fp_collective"] = {**chain.record, "regather": True, "phase": "backward"}
    return copies[chain.result]


def regather(graph_module: fx.GraphModule, params: bool = True, activations: bool = False) -> fx.GraphModule:
    graph = graph_module.graph
    order = positions(graph)
    all_gathers = [chain for chain in chains(graph) if chain.kind == "all_gather"]
    by_result = {chain.result: chain for chain in all_gathers}
    parameter_gathers = [chain.result for chain in all_gathers if is_parameter_gather(chain)]
    pipelined = any(STAGE in node.meta for node in graph.nodes)
    windows = ((_windows_by_phase if pipelined else use_windows)(parameter_gathers, order)) if params else {}
    if activations:
        others = [chain.result for chain in all_gathers if not is_parameter_gather(chain)]
        windows.update(use_windows(others, order, counted=list(by_result)))
    fresh = lambda value, before: _gather_again(graph, by_result[value], before)
    if use_fresh_copies(graph, windows, fresh, order):  # unchanged: no new code to generate
        graph_module.recompile()
    return graph_module
