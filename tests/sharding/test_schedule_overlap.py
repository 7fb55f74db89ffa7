"""Overlap: collectives are issued early and waited on late, one in flight per stream."""
from __future__ import annotations

import pytest

from sharding.schedule.chain import chains, is_parameter_gather, positions

from .equivalence import PROJECT_STRATEGIES
from .lowered import lower

COLLECTIVE_PARTS = ("to_front", "from_front", "wait", "pack", "unpack")


def _lower(strategy, **options):
    return lower(strategy, **options)[2]


def _is_compute(node):
    return node.op == "call_function" and "fp_collective" not in node.meta and \
        getattr(node.target, "__name__", "") not in COLLECTIVE_PARTS


@pytest.mark.parametrize("strategy", PROJECT_STRATEGIES)
def test_one_collective_in_flight_per_stream_and_waits_before_use(strategy):
    graph = _lower(strategy).graph.graph
    order = positions(graph)
    streams = {}
    for chain in chains(graph):
        assert order[chain.issue] < order[chain.wait] < min(order[c] for c in chain.consumers())
        streams.setdefault(chain.stream, []).append((order[chain.issue], order[chain.wait]))
    for intervals in streams.values():
        intervals.sort()
        assert all(previous[1] < current[0] for previous, current in zip(intervals, intervals[1:]))


def test_zero3_prefetches_the_next_gather_while_computing():
    lowered = _lower("zero3", bucket_bytes=0)
    graph = lowered.graph.graph
    nodes = list(graph.nodes)
    order = positions(graph)
    gathers = [c for c in chains(graph) if is_parameter_gather(c)]
    overlapped = [c for c in gathers if any(_is_compute(n) for n in nodes[order[c.issue]:order[c.wait]])]
    assert len(overlapped) >= len(gathers) // 2
    # each gather is issued right after the previous one's result, or at the start
    placeholders_end = max(order[n] for n in nodes if n.op == "placeholder")
    by_issue = sorted(gathers, key=lambda c: order[c.issue])
    for previous, chain in zip(by_issue, by_issue[1:]):
        assert order[chain.front] == order[previous.result] + 1
    # at the start: the token count (computed from the batch alone, issued first), then the first gather
    first = nodes[placeholders_end + 1:order[by_issue[0].front]]
    count = next(c for c in chains(graph) if c.kind == "all_reduce" and order[c.issue] < order[by_issue[0].front])
    assert count.issue in first
    assert not any(p.op == "placeholder" and p.meta["leaf"].startswith("params") for n in first for p in n.all_input_nodes)


def test_the_token_count_is_issued_at_the_start_and_waited_on_after_the_forward():
    """dp: the loss's divisor reads only the batch, so it is computed and issued before the first
    layer runs and is in flight while the forward computes."""
    graph = _lower("dp").graph.graph
    order = positions(graph)
    nodes = list(graph.nodes)
    count = chains(graph)[0]
    placeholders_end = max(order[n] for n in nodes if n.op == "placeholder")
    between = nodes[placeholders_end + 1:order[count.issue]]
    assert all(not any(p.op == "placeholder" and not p.meta["leaf"].startswith("batch") for p in n.all_input_nodes)
               for n in between)
    assert sum(_is_compute(n) for n in nodes[order[count.issue]:order[count.wait]]) > 50


def test_gradient_reductions_are_issued_when_the_gradient_is_ready():
    graph = _lower("zero2", bucket_bytes=0).graph.graph
    order = positions(graph)
    nodes = list(graph.nodes)
    reduce_scatters = [c for c in chains(graph) if c.kind == "reduce_scatter"]
    # nothing but the previous reduction's wait between the gradient and its reduce-scatter
    issued_at_once = [c for c in reduce_scatters
                      if not any(_is_compute(n) for n in nodes[order[c.source] + 1:order[c.front]])]
    assert len(issued_at_once) == len(reduce_scatters)
    last_backward = max(order[c.source] for c in reduce_scatters)
    assert min(order[c.issue] for c in reduce_scatters) < last_backward  # not all at the end


def test_overlap_does_not_change_the_collectives():
    plain, scheduled = _lower("fsdp_tp", overlap=False, bucket_bytes=0), _lower("fsdp_tp", bucket_bytes=0)
    key = lambda c: (c["kind"], c["axes"], c["shape"], c["value"])  # noqa: E731
    assert sorted(map(key, plain.collectives)) == sorted(map(key, scheduled.collectives))
