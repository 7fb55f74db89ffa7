"""After placement: when each host<->device transfer happens (ZeRO-Infinity's parameter offload).

`sharding.placement` makes one transfer per value that crosses kinds, just before its first
reader on the other side, and every later reader there shares it. For a parameter that lives on
host that copy would stay on device from the forward to the backward: all parameters at the
peak, what offloading them exists to avoid. The rules, the same as ZeRO-3's re-gather
(`sharding.schedule.regather`):
- a host input's copy up (h2d) serves one window of uses; a new window starts when, since its
  previous use, another host input's copy was used (the backward, a shared weight). Each later
  window gets its own h2d just before its first use, so a parameter is on device only while its
  layer computes, once in the forward and once in the backward;
- a value going down (d2h: a gradient to the host-side update) is copied right after it is
  computed, so its device storage can be freed before the rest of the backward runs.
Copies here are synchronous (on CUDA the h2d is `non_blocking` on the compute stream); a copy
stream that overlaps them with compute is not done yet.
"""
from __future__ import annotations

import torch.fx as fx

from .memory_kinds import TRANSFER_META
from .schedule.chain import positions
from .schedule.regather import use_windows, use_fresh_copies


def _is_input_fetch(node: fx.Node) -> bool:
    record = node.meta.get(TRANSFER_META)
    return record is not None and record["kind"] == "h2d" and node.args[0].op == "placeholder"


def _fetch_again(graph: fx.Graph, fetch: fx.Node, before: fx.Node) -> fx.Node:
    with graph.inserting_before(before):
        copy = graph.node_copy(fetch)
    copy.meta = dict(fetch.meta)
    copy.meta[TRANSFER_META] = {**fetch.meta[TRANSFER_META], "refetch": True,
                                "phase": before.meta.get("phase") or "forward"}
    return copy


def schedule_transfers(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Host inputs fetched once per window of use; values sent down as soon as they exist."""
    graph = graph_module.graph
    order = positions(graph)
    fetches = [node for node in graph.nodes if _is_input_fetch(node)]
    use_fresh_copies(graph, use_windows(fetches, order), lambda fetch, before: _fetch_again(graph, fetch, before),
                     order)
    for node in list(graph.nodes):
        record = node.meta.get(TRANSFER_META)
        if record is not None and record["kind"] == "d2h" and node.args[0].op != "placeholder":
            node.args[0].append(node)  # right after its value is computed
    graph.lint()
    graph_module.recompile()
    return graph_module
