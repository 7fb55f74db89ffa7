"""Cost model of a lowered step: the collective log, bytes moved, and the predicted peak memory.

`bytes` of a collective record is the size, per rank, of the full buffer on the collective's
axis: an all-gather's output, a reduce-scatter's input, an all-reduce's tensor (so one
all-reduce, or one reduce-scatter + all-gather pair of a tensor, each count its size once).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .liveness import peaks_by_kind
from .memory_kinds import DISK
from .placement import DEVICE, HOST, transfer_log

from .ops import REGISTRY

aten = torch.ops.aten

# Ops whose output is a view of their input: they allocate nothing (the schedule passes move and
# copy them freely; the planner follows them to the storage they alias).
VIEW_OPS = frozenset(op for op, entry in REGISTRY.items() if entry.view)


def collective_log(graph_module: fx.GraphModule) -> list[dict]:
    """Every collective, in program order (of its issue): kind, axes, bytes per rank, source line."""
    return [dict(node.meta.get("fp_collective") or node.meta["fp_p2p"]) for node in graph_module.graph.nodes
            if "fp_collective" in node.meta or "fp_p2p" in node.meta]


def collective_counts(records: list[dict]) -> list[dict]:
    """The lowered step's collectives grouped by (kind, mesh axes): count and bytes per rank."""
    groups: dict[tuple, dict] = {}
    for record in records:
        key = (record["kind"], "+".join(record["axes"]))  # a joint group: "dp+tp"
        group = groups.setdefault(key, {"kind": key[0], "axes": key[1], "count": 0, "bytes": 0})
        group["count"] += 1
        group["bytes"] += record["bytes"]
    return list(groups.values())


def estimate(graph_module: fx.GraphModule, inputs) -> dict:
    """Bytes moved per rank (total, per kind and per phase), collective count and peak live bytes per rank.

    `inputs` are this rank's flat local input tensors (real or fake): the peak counts them, every
    intermediate and the outputs (see `sharding.liveness`). With host memory in use
    (`sharding.placement`), `peak_bytes` counts both kinds, `device_peak_bytes` device storages
    only, `host_bytes` host storages only (the peak of each), and `transfer_bytes` the bytes a
    step copies device->host ("d2h") and host->device ("h2d"); with disk-kind values (`sharding.disk`)
    `disk_bytes` is the peak of file-backed storage and `disk_io_bytes` the bytes a step reads from
    and writes to it. `bytes_moved` stays collectives only.
    """
    log = collective_log(graph_module)
    by_kind: dict[str, int] = {}
    by_phase: dict[str, int] = {}  # forward / backward / optimizer (`sharding.phases`)
    for record in log:
        by_kind[record["kind"]] = by_kind.get(record["kind"], 0) + record["bytes"]
        for part in record.get("members") or (record,):  # a bucket's bytes by each member's phase
            phase = part.get("phase") or "forward"
            by_phase[phase] = by_phase.get(phase, 0) + part["bytes"]
    input_bytes = sum({x.untyped_storage()._cdata: x.untyped_storage().nbytes() for x in inputs
                       if x.device.type != "meta"}.values())  # a meta input: held by another pipeline stage
    peaks = peaks_by_kind(graph_module, inputs)
    transfers, disk_io = {"d2h": 0, "h2d": 0}, {"read": 0, "write": 0}
    for record in transfer_log(graph_module):
        (transfers if record["kind"] in transfers else disk_io)[record["kind"]] += record["bytes"]
    return {"bytes_moved": sum(by_kind.values()), "bytes_by_kind": by_kind, "bytes_by_phase": by_phase,
            "input_bytes": input_bytes,
            "peak_bytes": peaks["all"], "device_peak_bytes": peaks[DEVICE], "host_bytes": peaks[HOST],
            "transfer_bytes": transfers, "disk_bytes": peaks[DISK], "disk_io_bytes": disk_io,
            "num_collectives": len(log)}
