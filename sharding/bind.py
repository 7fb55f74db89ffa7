"""Stage 7 (the last), bind: the concrete mesh enters the program here and nowhere before.

Every stage before this one sees only the mesh's axis names and sizes, so a step lowered on
`Mesh.abstract` is the same program as on any rank of a real mesh. What differs per rank is
written as a placeholder while inserting: `RankIndex` (this rank's position along some axes, a
slice's block or a lookup's first row) and `AxisGroup` (the process group along some axes).
Binding replaces each with this rank's value.
"""
from __future__ import annotations

from typing import NamedTuple

import torch.fx as fx

from . import lazy


class RankIndex(NamedTuple):
    """This rank's position along `axes` (mesh axis indices, outer first), times `scale`."""

    axes: tuple
    scale: int = 1


class AxisGroup(NamedTuple):
    """The process group of this rank's peers along `axes` (mesh axis indices): one axis or a joint group."""

    axes: tuple


def rank_index(axes: tuple, coordinate: tuple, axis_sizes: tuple, scale: int = 1) -> int:
    index = 0
    for axis in axes:
        index = index * axis_sizes[axis] + coordinate[axis]
    return index * scale


def _bound(arg, mesh):
    if mesh is None:  # sizing only, see as_rank_zero
        return 0 if isinstance(arg, RankIndex) else "<" + "+".join(str(a) for a in arg.axes) + ">"
    if isinstance(arg, RankIndex):
        return rank_index(arg.axes, mesh.coordinate, mesh.axis_sizes, arg.scale)
    if isinstance(arg, AxisGroup):
        if mesh.abstract_only:
            return "<" + "+".join(mesh.axis_names[a] for a in arg.axes) + ">"
        return mesh.group_name(arg.axes)
    return arg


def _map(arg, fn):
    """`arg` with every placeholder in it replaced by `fn(placeholder)` (fx's own map_aggregate
    would open the placeholders, which are tuples)."""
    if isinstance(arg, (RankIndex, AxisGroup)):
        return fn(arg)
    if isinstance(arg, (tuple, list)) and not hasattr(arg, "_fields"):
        return (tuple if isinstance(arg, tuple) else list)(_map(a, fn) for a in arg)
    if isinstance(arg, dict):
        return {k: _map(v, fn) for k, v in arg.items()}
    return arg


def as_rank_zero(arg):
    """`arg` with its placeholders bound for sizing only (fake runs before `bind`: shapes do not
    depend on the rank, so rank 0 stands for every rank)."""
    return _map(arg, lambda a: _bound(a, None))


def placeholders(graph_module: fx.GraphModule) -> list:
    """Every rank-dependent argument still unbound, in program order."""
    found = []
    for node in graph_module.graph.nodes:
        _map((node.args, node.kwargs), found.append)
    return found


def bind(graph_module: fx.GraphModule, mesh) -> fx.GraphModule:
    """A copy of `graph_module` for this rank of `mesh` (an abstract mesh binds as its rank)."""
    if not placeholders(graph_module):
        return graph_module
    graph = fx.Graph()
    env: dict = {}
    for node in graph_module.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        new.args = _map(new.args, lambda a: _bound(a, mesh))
        new.kwargs = _map(new.kwargs, lambda a: _bound(a, mesh))
        env[node] = new
    return lazy.module(graph_module, graph)  # built from the finished graph: it copies the constants it uses
