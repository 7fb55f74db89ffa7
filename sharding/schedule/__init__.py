"""Stage 5, schedule: passes over the lowered per-rank graph that change when things happen, not what.

`regather` (ZeRO-3: gather a parameter again for the backward), `bucket` (merge small
collectives of one kind on one axis), `overlap` (issue early, wait late, prefetch the next
gather). Each is a function `GraphModule -> GraphModule`, usable alone; `schedule` runs them
in that order. Every rank lowers the same graph, so every rank issues collectives in the same order.
"""
from __future__ import annotations

import torch.fx as fx

from .bucket import DEFAULT_BUCKET_BYTES, bucket
from .overlap import overlap
from .regather import regather

__all__ = ["regather", "bucket", "overlap", "schedule", "DEFAULT_BUCKET_BYTES"]


def schedule(graph_module: fx.GraphModule, axis_sizes, *, regather_params: bool = True,
             regather_activations: bool = False, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
             overlap_communication: bool = True, data_inputs: frozenset = frozenset(),
             bucket_per_layer: bool = False) -> fx.GraphModule:
    """`axis_sizes`: the mesh's (bucketing needs each collective's local size); `data_inputs`: the
    positions of the data inputs among the graph's placeholders."""
    if regather_params or regather_activations:
        graph_module = regather(graph_module, params=regather_params, activations=regather_activations)
    graph_module = bucket(graph_module, axis_sizes, bucket_bytes, per_layer=bucket_per_layer)
    if overlap_communication:
        graph_module = overlap(graph_module, data_inputs)
    return graph_module
