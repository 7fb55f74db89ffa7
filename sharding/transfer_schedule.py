"""After placement: when each host<->device transfer happens (ZeRO-Infinity's parameter offload).

`sharding.placement` makes one transfer per value that crosses kinds, just before its first
reader on the other side, and every later reader there shares it. For a parameter that lives on
host that copy would stay on device from the forward to the backward: all parameters at the
peak, what offloading them exists to avoid. The rules, the same as ZeRO-3's re-gather
(`sharding.schedule.regather`) and overlap (`sharding.schedule.overlap`):
- a host input's copy up (h2d) serves one window of uses; a new window starts when, since its
  previous use, another host input's copy was used (the backward, a shared weight). Each later
  window gets its own h2d, so a parameter is on device only around its layer's forward and its
  layer's backward;
- every transfer is issued and waited on apart (`sharding.copies`: a worker thread on CPU, a copy
  stream on CUDA) and waited on just before its first use;
- a host input's fetch is issued when the previous fetch is waited on (the next parameter comes
  up while the current one computes, one in flight, as ZeRO-3's gathers are prefetched);
- any other transfer (a gradient going down to the host-side update, an update coming back up)
  is issued right after its value is computed, so the rest of the step runs while it copies;
- copies of one direction run one at a time, in program order (as collectives of one stream): each
  is waited on before the next one of its direction is issued, if that comes before its first
  use, so a gradient's device storage is freed once the next gradient starts going down.
"""
from __future__ import annotations

import torch.fx as fx

from .memory_kinds import TRANSFER_META
from .copies import issue_copy, wait_copy
from .schedule.chain import Order, positions
from .schedule.regather import use_windows, use_fresh_copies


def _is_input_fetch(node: fx.Node) -> bool:
    record = node.meta.get(TRANSFER_META)
    return record is not None and record["kind"] == "h2d" and node.args[0].op == "placeholder"  # a fetch or its issue


def _fetch_again(graph: fx.Graph, fetch: fx.Node, before: fx.Node) -> fx.Node:
    with graph.inserting_before(before):
        copy = graph.node_copy(fetch)
    copy.meta = dict(fetch.meta)
    copy.meta[TRANSFER_META] = {**fetch.meta[TRANSFER_META], "refetch": True,
                                "phase": before.meta.get("phase") or "forward"}
    return copy


def _split(graph: fx.Graph, node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """A synchronous transfer node as an issue (it keeps the record) and a wait."""
    record = node.meta[TRANSFER_META]
    device = node.args[1] if record["kind"] == "h2d" else None
    with graph.inserting_before(node):
        issue = graph.call_function(issue_copy, (node.args[0], record["kind"], device))
        wait = graph.call_function(wait_copy, (issue, node.args[0]))
    issue.meta = dict(node.meta)
    wait.meta = {key: value for key, value in node.meta.items() if key != TRANSFER_META}
    node.replace_all_uses_with(wait)
    graph.erase_node(node)
    return issue, wait


def schedule_transfers(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Host inputs fetched once per window of use, one ahead; every other copy issued as soon as its
    value exists; each waited on just before its first use."""
    graph = graph_module.graph
    order = positions(graph)
    fetches = [node for node in graph.nodes if _is_input_fetch(node)]
    use_fresh_copies(graph, use_windows(fetches, order), lambda fetch, before: _fetch_again(graph, fetch, before),
                     order)
    last_placeholder = [node for node in graph.nodes if node.op == "placeholder"][-1]
    pairs = [_split(graph, node) for node in list(graph.nodes) if TRANSFER_META in node.meta]
    order = Order(graph)
    first_use = {wait: min(wait.users, key=order.__getitem__) for _, wait in pairs}
    inputs = sorted((pair for pair in pairs if _is_input_fetch(pair[0])), key=lambda pair: order[first_use[pair[1]]])
    previous_wait = last_placeholder
    for issue, wait in inputs:
        order.move_before(first_use[wait], wait)
        order.move_after(previous_wait, issue)
        previous_wait = wait
    for issue, wait in pairs:
        if not _is_input_fetch(issue):
            source = issue.args[0]
            order.move_after(last_placeholder if source.op == "placeholder" else source, issue)
            order.move_before(first_use[wait], wait)
    for kind in ("h2d", "d2h"):  # one copy in flight per direction: its source is freed before the next starts
        stream = sorted((pair for pair in pairs if pair[0].meta[TRANSFER_META]["kind"] == kind),
                        key=lambda pair: order[pair[0]])
        for (_, wait), (next_issue, _) in zip(stream, stream[1:]):
            if order[next_issue] < order[wait]:
                order.move_before(next_issue, wait)
    graph.lint()
    graph_module.recompile()
    return graph_module
