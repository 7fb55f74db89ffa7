"""Cost model of a lowered step: the collective log, bytes moved, and a liveness estimate of peak memory."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .layout import Layout

aten = torch.ops.aten

# Ops whose output aliases their input's storage: they allocate nothing.
VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.t.default, aten.transpose.int,
            aten.permute.default, aten.expand.default, aten.slice.Tensor, aten.select.int, aten.unsqueeze.default,
            aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default, aten.detach.default}


def collective_log(graph_module: fx.GraphModule) -> list[dict]:
    """Every inserted collective, in program order: kind, axes, bytes per rank, source line."""
    return [dict(node.meta["fp_collective"]) for node in graph_module.graph.nodes if "fp_collective" in node.meta]


def _local_bytes(node, axis_sizes) -> int:
    val = node.meta.get("val")
    layout = node.meta.get("fp_layout")
    values = val if isinstance(val, (list, tuple)) else [val]
    layouts = layout if isinstance(layout, tuple) else [layout] * len(values)
    total = 0
    for v, lay in zip(values, layouts):
        if isinstance(v, torch.Tensor):
            numel = v.numel()
            if isinstance(lay, Layout):
                numel = 1
                for size in lay.local_shape(v.shape, axis_sizes):
                    numel *= size
            total += numel * v.element_size()
    return total


def peak_bytes(graph_module: fx.GraphModule, axis_sizes) -> int:
    """Peak of live tensor bytes per rank, walking the graph in order; inputs are live throughout."""
    nodes = list(graph_module.graph.nodes)
    root = {}
    for node in nodes:
        root[node] = root.get(node.args[0], node.args[0]) if (node.op == "call_function" and node.target in VIEW_OPS
                                                               and isinstance(node.args[0], fx.Node)) else node
    last_use = {}
    for index, node in enumerate(nodes):
        for inp in node.all_input_nodes:
            last_use[root[inp]] = index
    live = sum(_local_bytes(n, axis_sizes) for n in nodes if n.op == "placeholder")
    peak = live
    sizes = {}
    for index, node in enumerate(nodes):
        if node.op == "call_function" and root[node] is node and node.target is not operator.getitem:
            sizes[node] = _local_bytes(node, axis_sizes)
            live += sizes[node]
            peak = max(peak, live)
        for inp in node.all_input_nodes:
            base = root[inp]
            if last_use.get(base) == index and base in sizes:
                live -= sizes.pop(base)
    return peak


def estimate(graph_module: fx.GraphModule, axis_sizes) -> dict:
    log = collective_log(graph_module)
    by_kind: dict[str, int] = {}
    for record in log:
        by_kind[record["kind"]] = by_kind.get(record["kind"], 0) + record["bytes"]
    return {"bytes_moved": sum(by_kind.values()), "bytes_by_kind": by_kind,
            "peak_bytes": peak_bytes(graph_module, axis_sizes), "num_collectives": len(log)}
