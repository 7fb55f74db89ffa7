"""Stage 5, schedule: passes over the lowered per-rank graph that change when things happen, not what.

`regather` (ZeRO-3: gather a parameter again for the backward), `bucket` (merge small
collectives of one kind on one axis), `overlap` (issue early, wait late, prefetch the next
gather). Each is a function `GraphModule -> GraphModule`, usable alone; `schedule` runs them
in that order. Every rank lowers the same graph, so every rank issues collectives in the same order.
"""
from __future__ import annotations

import torch.fx as fx

from .overlap import overlap
from .regather import regather

__all__ = ["regather", "overlap", "schedule"]


def schedule(graph_module: fx.GraphModule, *, regather_params: bool = True,
             overlap_communication: bool = True) -> fx.GraphModule:
    if regather_params:
        graph_module = regather(graph_module)
    if overlap_communication:
        graph_module = overlap(graph_module)
    return graph_module
