"""Cost model of a lowered step: the collective log, bytes moved, and the predicted peak memory.

`bytes` of a collective record is the size, per rank, of the full buffer on the collective's
axis: an all-gather's output, a reduce-scatter's input, an all-reduce's tensor (so one
all-reduce, or one reduce-scatter + all-gather pair of a tensor, each count its size once).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .liveness import peak_bytes

aten = torch.ops.aten

# Ops whose output is a view of their input: they allocate nothing (the schedule passes move and
# copy them freely; the planner follows them to the storage they alias).
VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.t.default, aten.transpose.int,
            aten.permute.default, aten.expand.default, aten.slice.Tensor, aten.select.int, aten.unsqueeze.default,
            aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default, aten.detach.default}


def collective_log(graph_module: fx.GraphModule) -> list[dict]:
    """Every collective, in program order (of its issue): kind, axes, bytes per rank, source line."""
    return [dict(node.meta["fp_collective"]) for node in graph_module.graph.nodes if "fp_collective" in node.meta]


def collective_counts(records: list[dict]) -> list[dict]:
    """The lowered step's collectives grouped by (kind, mesh axes): count and bytes per rank."""
    groups: dict[tuple, dict] = {}
    for record in records:
        key = (record["kind"], "/".join(record["axes"]))
        group = groups.setdefault(key, {"kind": key[0], "axes": key[1], "count": 0, "bytes": 0})
        group["count"] += 1
        group["bytes"] += record["bytes"]
    return list(groups.values())


def estimate(graph_module: fx.GraphModule, inputs) -> dict:
    """Bytes moved per rank (total and per kind), collective count and peak live bytes per rank.

    `inputs` are this rank's flat local input tensors (real or fake): the peak counts them, every
    intermediate and the outputs (see `sharding.liveness`).
    """
    log = collective_log(graph_module)
    by_kind: dict[str, int] = {}
    for record in log:
        by_kind[record["kind"]] = by_kind.get(record["kind"], 0) + record["bytes"]
    input_bytes = sum({x.untyped_storage()._cdata: x.untyped_storage().nbytes() for x in inputs}.values())
    return {"bytes_moved": sum(by_kind.values()), "bytes_by_kind": by_kind, "input_bytes": input_bytes,
            "peak_bytes": peak_bytes(graph_module, inputs), "num_collectives": len(log)}
