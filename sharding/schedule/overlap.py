"""Schedule pass: issue collectives early and wait on them late, so communication overlaps compute.

Collectives of one kind on one process group form a *stream* and run one at a time in program
order (as NCCL runs one stream per group, and as FSDP2 keeps one all-gather and one
reduce-scatter in flight), so memory held by in-flight collectives stays bounded:
- a gather (its output is bigger than its input) is issued right after the previous gather of
  its stream is waited on, and waited on just before its first use: the next layer's parameters
  arrive while the current layer computes (prefetch one ahead);
- a reduction (reduce-scatter, all-reduce) is issued as soon as its input is computed and waited
  on just before its first use, or before the next reduction of its stream is issued;
- a reduction whose input is computed from the data inputs alone (the loss's token count) is
  computed and issued first thing in the step, so the forward runs while it is in flight (not in
  a pipeline, whose ops keep their place in their schedule's actions).
Every rank lowers the same graph, so every rank issues the same collectives in the same order.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from ..pipelining import STAGE
from ..random_ops import RANDOM_OPS
from .chain import Chain, Order, chains


def _last_placeholder(graph: fx.Graph) -> fx.Node:
    return [node for node in graph.nodes if node.op == "placeholder"][-1]


def _ready(chain: Chain, graph: fx.Graph, order: Order) -> fx.Node:
    """The node after which every input of the collective exists."""
    computed = [s for s in chain.sources if s.op != "placeholder"]
    return max(computed, key=order.__getitem__) if computed else _last_placeholder(graph)


def _issue_after(chain: Chain, anchor: fx.Node, order: Order) -> None:
    order.move_after(anchor, chain.front)
    order.move_after(chain.front, chain.issue)


def _wait_before(chain: Chain, node: fx.Node, order: Order) -> None:
    order.move_before(node, chain.wait)
    if chain.result is not chain.wait:
        order.move_before(node, chain.result)
        for item in [user for user in chain.result.users if user.target is operator.getitem]:
            order.move_before(node, item)  # a bucket's per-member results


def _first_consumer(chain: Chain, order: Order) -> fx.Node:
    return min(chain.consumers(), key=order.__getitem__)


def _prefetch(graph: fx.Graph, stream: list[Chain], order: Order) -> None:
    stream = sorted(stream, key=lambda c: order[_first_consumer(c, order)])
    previous_result = None
    for chain in stream:
        _wait_before(chain, _first_consumer(chain, order), order)
        anchor = _ready(chain, graph, order)
        if previous_result is not None and order[previous_result] > order[anchor]:
            anchor = previous_result
        _issue_after(chain, anchor, order)
        previous_result = chain.result


def _batch_only_closure(chain: Chain, data_inputs: set) -> list[fx.Node] | None:
    """The computed nodes the collective's input needs, when they read only data inputs and
    constants (None when they read anything else, another collective's result, or draw random
    numbers: those keep their place)."""
    seen, stack, found = set(), list(chain.sources), []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            if node not in data_inputs:
                return None
            continue
        if node.op == "get_attr":
            continue
        if node.op != "call_function" or "fp_collective" in node.meta or STAGE in node.meta \
                or node.target in RANDOM_OPS:
            return None
        found.append(node)
        stack.extend(node.all_input_nodes)
    return found


def _hoist_batch_only(graph: fx.Graph, stream: list[Chain], order: Order, data_inputs: set) -> None:
    """Move the input computation of each data-only reduction to the step's start, in program order."""
    anchor = _last_placeholder(graph)
    for chain in stream:
        closure = _batch_only_closure(chain, data_inputs)
        if not closure:
            continue
        for node in sorted(closure, key=order.__getitem__):
            order.move_after(anchor, node)
            anchor = node


def _reduce_early(graph: fx.Graph, stream: list[Chain], order: Order) -> None:
    stream = sorted(stream, key=lambda c: order[_ready(c, graph, order)])
    previous = None
    for chain in stream:
        anchor = _ready(chain, graph, order)
        if previous is not None and order[previous.issue] > order[anchor]:
            anchor = previous.issue
        _issue_after(chain, anchor, order)
        previous = chain
    for index, chain in enumerate(stream):
        limit = [_first_consumer(chain, order)] + ([stream[index + 1].front] if index + 1 < len(stream) else [])
        _wait_before(chain, min(limit, key=order.__getitem__), order)


def overlap(graph_module: fx.GraphModule, data_inputs: frozenset = frozenset()) -> fx.GraphModule:
    """`data_inputs`: the positions of the step's data inputs among its placeholders."""
    graph = graph_module.graph
    streams: dict[tuple, list[Chain]] = {}
    for chain in chains(graph):
        streams.setdefault(chain.stream, []).append(chain)
    order = Order(graph)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    data = {placeholders[i] for i in data_inputs}
    for (kind, *_), stream in streams.items():
        if kind != "all_gather" and data:
            _hoist_batch_only(graph, sorted(stream, key=lambda c: order[c.issue]), order, data)
        (_prefetch if kind == "all_gather" else _reduce_early)(graph, stream, order)
    graph.lint()
    graph_module.recompile()
    return graph_module
