"""Layout hints: which shard a value would like, from the elementwise component it belongs to.

Values joined by same-shape elementwise ops (a gradient, the Adam moments updated from it, the
new parameter) form one component. Its hint on an axis is the shard that any input spec,
`out_spec` or `constrain` in it asks for, else Replicate. A `Partial` that must be reduced is
reduce-scattered into the hinted shard or all-reduced when the hint is Replicate — which is
what makes ZeRO-1/2 reduce-scatter gradients and DP all-reduce them, from specs alone.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .constrain import decode_spec, keeps_other_axes
from .errors import ShardingError
from .layout import REPLICATE, Layout, Strided, layout_from_spec, split_dim
from .ops import creates_zeros, joins_component

aten = torch.ops.aten


class Hints:
    def __init__(self, graph: torch.fx.Graph, in_layouts: Sequence[Layout], out_layouts: Sequence[Layout],
                 axis_names: Sequence[str], axis_sizes: Sequence[int]):
        self.parent: dict = {}
        self.num_axes = len(axis_names)
        self.zeros: set = set()
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            if creates_zeros(node):
                self.zeros.add(node)
            if joins_component(node):
                shape = _shape(node)
                for arg in node.args:
                    if isinstance(arg, torch.fx.Node) and _shape(arg) == shape:
                        self._union(arg, node)
        self.component_hint: dict = {}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for node, layout in zip(placeholders, in_layouts):
            self._add_hint(node, layout)
        output = next(n for n in graph.nodes if n.op == "output")
        for node, layout in zip(output.args[0], out_layouts):
            if isinstance(node, torch.fx.Node):
                self._add_hint(node, layout)
        for node in graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.fp.constrain.default \
                    and not keeps_other_axes(node.args[1]):  # a partial constraint hints nothing
                try:
                    self._add_hint(node, layout_from_spec(decode_spec(node.args[1]), _shape(node),
                                                          axis_names, axis_sizes))
                except ShardingError:
                    pass  # reported with its source line when propagation reaches the node
        self._through_reshapes(graph, axis_sizes)

    def _through_reshapes(self, graph, axis_sizes) -> None:
        """A reshape's input component without a hint takes its output's, translated: a split of an
        output dim that a reshape cut out of one input dim is, on that input dim, the same split of each
        of the pieces before it (`Strided`). So a Partial reduced before an unflattening view (GPT-2's
        Conv1D: `addmm` over [b*s, d], then [b, s, d] whose seq dim SP splits) is reduce-scattered into
        the shard the view hands on, not all-reduced."""
        from .rules.views import view_groups  # the rules import this module

        for node in graph.nodes:
            if node.op != "call_function" or node.target not in _RESHAPES:
                continue
            source = node.args[0]
            in_shape, out_shape = _shape(source), _shape(node)
            if not isinstance(source, torch.fx.Node) or in_shape is None or out_shape is None or \
                    self.same_component(source, node):
                continue
            hint = self.component_hint.get(self._find(node))
            if hint is None:
                continue
            translated, local = [], list(out_shape)  # the block the axes before each one leave
            for placement, size in zip(hint, axis_sizes):
                translated.append(_split_before_reshape(placement, in_shape, out_shape, local, size, view_groups))
                if split_dim(placement) is not None and not isinstance(placement, Strided):
                    local[split_dim(placement)] //= size
            if any(p is not None for p in translated):
                self._add_hint(source, Layout(tuple(p if p is not None else REPLICATE for p in translated)))

    def _find(self, node):
        root = node
        while self.parent.get(root, root) is not root:
            root = self.parent[root]
        while node is not root:
            self.parent[node], node = root, self.parent.get(node, node)
        return root

    def _union(self, a, b) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra is not rb:
            self.parent[ra] = rb

    def same_component(self, a, b) -> bool:
        return self._find(a) is self._find(b)

    def _add_hint(self, node, layout: Layout) -> None:
        root = self._find(node)
        current = list(self.component_hint.get(root, (None,) * self.num_axes))
        for axis, placement in enumerate(layout.placements):
            if split_dim(placement) is not None and split_dim(current[axis]) is None:
                current[axis] = placement
            elif current[axis] is None and placement == REPLICATE:
                current[axis] = REPLICATE
        self.component_hint[root] = tuple(current)

    def placement(self, node, axis: int):
        """The hinted placement of `node` on `axis`: a shard dim, REPLICATE, or None (no opinion)."""
        hint = self.component_hint.get(self._find(node))
        return None if hint is None else hint[axis]

    def is_zeros(self, node) -> bool:
        return node in self.zeros


_RESHAPES = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})


def _split_before_reshape(placement, in_shape, out_shape, out_local, axis_size, view_groups):
    """The input-side placement of a plain split of output dim `placement`, or None when the output
    dim is not cut out of a single input dim (or does not divide). `out_local`: the output's sizes
    within the block earlier mesh axes leave, which is where the pieces are counted."""
    if isinstance(placement, Strided) or split_dim(placement) is None:
        return None
    dim = split_dim(placement)
    for in_dims, out_dims in view_groups(in_shape, out_shape):
        if dim not in out_dims:
            continue
        if len(in_dims) != 1 or out_local[dim] % axis_size:
            return None
        pieces = math.prod(out_local[d] for d in out_dims[:out_dims.index(dim)])
        return Strided(in_dims[0], pieces) if pieces > 1 else in_dims[0]
    return None


def _shape(node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
