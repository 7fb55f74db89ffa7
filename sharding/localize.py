"""Stage 4, localize: rewrite the global sizes baked into shape arguments to this rank's sizes
(and drop the `constrain` marks, whose layouts insert has already made true).

The traced graph records `view [256, 32]`, `expand [16, 4, 16, 16]`, `new_zeros [64, 32]`;
after partitioning each must say the local size. The local size of a node's output is its
global size divided by its layout's shard counts, so each op only names (in `sharding.ops`)
which argument holds its output shape.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .errors import PropagationError
from .layout import Layout, layout_of, split_dim
from .ops import facts
from .source import source_line

aten = torch.ops.aten


def _contiguous_strides(shape):
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= size
    return list(reversed(strides))


def _localize_split(node, layouts, axis_sizes) -> None:
    """A split along a dim its pieces are split on takes local piece sizes (each piece's own)."""
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    pieces = node.meta["val"]
    dim %= pieces[0].dim()
    local = [layout.local_shape(piece.shape, axis_sizes)[dim] for piece, layout in zip(pieces, layouts)]
    if local == [piece.shape[dim] for piece in pieces]:
        return
    args = list(node.args)
    if node.target is aten.split.Tensor:
        if len(set(local)) != 1:
            raise PropagationError(f"split {node.name} into pieces of unequal local sizes {local} "
                                   f"(at {source_line(node)})")
        args[1] = local[0]
    else:
        args[1] = local
    node.args = tuple(args)


def _drop_constraints(graph: fx.Graph) -> None:
    """A `constrain` has done its work once its input is redistributed (insert): it is an identity,
    so its users read that input (no copy per constraint at run time)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.fp.constrain.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def localize(graph_module: fx.GraphModule, axis_sizes) -> fx.GraphModule:
    _drop_constraints(graph_module.graph)
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        layout = layout_of(node)
        entry = facts(node.target)
        if entry.split_sizes and isinstance(layout, tuple):
            _localize_split(node, layout, axis_sizes)
            continue
        if not isinstance(layout, Layout) or not any(split_dim(p) is not None for p in layout.placements):
            continue
        global_shape = tuple(node.meta["val"].shape)
        local_shape = layout.local_shape(global_shape, axis_sizes)
        if entry.shape_arg is not None:
            args = list(node.args)
            args[entry.shape_arg] = local_shape
            if entry.stride_arg is not None:
                args[entry.stride_arg] = _contiguous_strides(local_shape)
            node.args = tuple(args)
        elif node.target in (aten.arange.default, aten.arange.start, aten.arange.start_step):
            raise PropagationError(f"arange {node.name} was given a split layout; it cannot be localized "
                                   f"(at {source_line(node)})")
    graph_module.recompile()
    return graph_module
